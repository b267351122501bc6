"""Images: checks, sizes and resizing, and the diffusers VAE between images and raw latents (latents.py has the
latent conventions).

IMAGE tensors are ComfyUI's [B, H, W, 3] float in 0..1.
"""

import torch
import torch.nn.functional as F
from PIL import Image

MIN_IMAGE_SIDE = 64


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
