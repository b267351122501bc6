"""Images <-> SD3 VAE latents, sizes for the DiT's patch grid.

IMAGE tensors are ComfyUI's [B, H, W, 3] float in 0..1. "Raw" latents are what the VAE encoder gives
([B, 16, H/8, W/8], what native VAE Encode/Decode use); "model-space" latents are (raw - shift) * scale,
what the DiT sees.
"""

import torch
import torch.nn.functional as F
from PIL import Image

MIN_IMAGE_SIDE = 64
LATENT_TO_IMAGE = 8  # SD3 VAE: one latent pixel is 8x8 image pixels


def to_pil(image: torch.Tensor) -> Image.Image:
    """[H, W, 3] float 0..1 -> PIL RGB."""
    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().cpu().numpy())


def check_image(image: torch.Tensor, name: str) -> None:
    """Raise a ValueError naming `name` when `image` is not a usable [B, H, W, 3] IMAGE of at least 64 px."""
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"{name}: expected an IMAGE [batch, height, width, 3], got shape {tuple(image.shape)}")
    batch, height, width, _ = image.shape
    if batch == 0 or min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name}: image is {width}x{height} (batch {batch}); UniPic2 needs at least "
                         f"{MIN_IMAGE_SIDE} px on each side -- use a larger image")
    check_finite(image, f"{name}: image", "a broken image file or an image node that failed")


def check_finite(tensor: torch.Tensor, name: str, likely_cause: str) -> None:
    """Raise a ValueError naming `name` and the likely cause when `tensor` holds NaN or infinite values."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values -- check the node that made it ({likely_cause})")


def check_latent(raw: torch.Tensor, name: str, likely_cause: str) -> None:
    """Raise a ValueError naming `name` unless `raw` is a non-empty, finite latent [B, C, h, w]."""
    if raw.ndim != 4:
        raise ValueError(f"{name} has shape {tuple(raw.shape)}; expected an image latent [batch, channels, height, "
                         "width] -- connect Empty Latent Image, a VAE Encode or a sampler")
    batch, _, height, width = raw.shape
    if batch == 0 or height == 0 or width == 0:
        raise ValueError(f"{name} is empty (batch {batch}, {width}x{height} latent pixels) -- it needs at least one "
                         f"image of at least {LATENT_TO_IMAGE}x{LATENT_TO_IMAGE} px; check the node that made it")
    check_finite(raw, name, likely_cause)


def check_grid_size(raw: torch.Tensor, name: str, patch: int, pos_embed_max_size: int | None) -> None:
    """Raise a ValueError naming `name` when the latent's sides exceed the DiT's position-embedding grid.

    The DiT crops its absolute position embedding (pos_embed_max_size patches per side) for the target and for
    the reference alike, so neither may exceed pos_embed_max_size * patch latent pixels per side.
    """
    if pos_embed_max_size is None:
        return
    height, width = raw.shape[-2:]
    limit = pos_embed_max_size * patch
    if max(height, width) > limit:
        raise ValueError(
            f"{name} is {width}x{height} latent pixels ({width * LATENT_TO_IMAGE}x{height * LATENT_TO_IMAGE} px); "
            f"the DiT's position grid allows at most {limit} latent pixels per side ({limit * LATENT_TO_IMAGE} px) "
            "-- use a smaller size (Empty Latent Image, or a lower longer_edge in UniPic2 Edit Reference)")


def round_to_multiple(value: float, multiple: int) -> int:
    """The multiple of `multiple` nearest to `value`, and at least `multiple`: a side never rounds to nothing."""
    return max(multiple, round(value / multiple) * multiple)


def longer_edge_size(width: int, height: int, longer_edge: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with the longer side = longer_edge and the shorter rounded to a multiple, aspect kept.

    Same rounding as the official editing script; longer_edge itself must be a multiple of `multiple`.
    """
    if longer_edge % multiple:
        raise ValueError(f"longer edge {longer_edge} must be a multiple of {multiple}")
    if width >= height:
        return longer_edge, round_to_multiple(height * longer_edge / width, multiple)
    return round_to_multiple(width * longer_edge / height, multiple), longer_edge


def resize_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bicubic, antialiased resize of an IMAGE [B, H, W, 3] -> [B, height, width, 3], clamped to 0..1."""
    if image.shape[1:3] == (height, width):
        return image
    x = F.interpolate(image.movedim(-1, 1).float(), size=(height, width), mode="bicubic", antialias=True,
                      align_corners=False)
    return x.clamp(0, 1).movedim(1, -1)


def vae_scaling(vae) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from the VAE config (0.0609, 1.5305 for SD3)."""
    return float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)


def raw_to_model(raw: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    return (raw.float() - shift) * scale


def model_to_raw(latent: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    return latent.float() / scale + shift


@torch.no_grad()
def vae_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] 0..1 -> raw latent [B, C, H/8, W/8] (float32, CPU); the posterior mean, deterministic."""
    x = image.movedim(-1, 1).to(device=vae.device, dtype=vae.dtype) * 2 - 1
    return vae.encode(x).latent_dist.mode().float().cpu()


@torch.no_grad()
def vae_decode(vae, raw: torch.Tensor) -> torch.Tensor:
    """Raw latent [B, C, h, w] -> IMAGE [B, 8h, 8w, 3] 0..1 (float32, CPU)."""
    x = vae.decode(raw.to(device=vae.device, dtype=vae.dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()
