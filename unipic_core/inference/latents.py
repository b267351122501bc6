"""SD3's latent conventions in one place: raw vs model space, channels, the VAE's downsampling and the DiT's grid.

"Raw" latents are what the VAE encoder gives, [B, 16, H/8, W/8]: ComfyUI's LATENT, what native VAE Encode / Decode
use. "Model-space" latents are (raw - shift) * scale: what the DiT sees. The DiT cuts a latent into patch x patch
tokens, so a latent side is a multiple of `patch` and an image side a multiple of vae_factor * patch px (16 for
SD3).
"""

from dataclasses import dataclass

import torch

from .images import check_finite, round_to_multiple


@dataclass(frozen=True)
class LatentSpace:
    """One VAE + DiT pair's latent conventions; the defaults are SD3's (UniPic2's VAE and DiT)."""

    shift: float = 0.0609
    scale: float = 1.5305
    channels: int = 16
    vae_factor: int = 8  # image pixels per latent pixel, per side
    patch: int = 2  # latent pixels per DiT token, per side

    @classmethod
    def from_vae_config(cls, config, patch: int = 2) -> "LatentSpace":
        """From a diffusers AutoencoderKL config (its config.json as a dict, or a model's .config)."""
        return cls(float(config.get("shift_factor") or 0.0), float(config["scaling_factor"]),
                   config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1), patch)

    def to_model(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() - self.shift) * self.scale

    def to_raw(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.float() / self.scale + self.shift

    def shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height / vae_factor, width / vae_factor): the shape of one latent of an image size in px."""
        return self.channels, height // self.vae_factor, width // self.vae_factor

    def empty(self, batch: int, width: int, height: int) -> torch.Tensor:
        """The zero raw latent [batch, channels, height / vae_factor, width / vae_factor] of an image size in px."""
        return torch.zeros(batch, *self.shape(width, height))

    def image_tokens(self, width: int, height: int) -> int:
        """How many DiT tokens an image of this size in px makes: the length a dynamic-shift schedule reads."""
        side = self.vae_factor * self.patch
        return (height // side) * (width // side)

    def grid_size(self, raw: torch.Tensor) -> tuple[int, int]:
        """(height, width) of a latent [..., h, w] rounded to the DiT's patch grid."""
        return tuple(round_to_multiple(side, self.patch) for side in raw.shape[-2:])

    def check_latent(self, raw: torch.Tensor, name: str, likely_cause: str) -> None:
        """Raise a ValueError naming `name` unless `raw` is a non-empty, finite latent [B, C, h, w]."""
        if raw.ndim != 4:
            raise ValueError(f"{name} has shape {tuple(raw.shape)}; expected an image latent [batch, channels, "
                             "height, width] -- connect Empty Latent Image, a VAE Encode or a sampler")
        batch, _, height, width = raw.shape
        if batch == 0 or height == 0 or width == 0:
            raise ValueError(f"{name} is empty (batch {batch}, {width}x{height} latent pixels) -- it needs at least "
                             f"one image of at least {self.vae_factor}x{self.vae_factor} px; check the node that "
                             "made it")
        check_finite(raw, name, likely_cause)

    def check_grid_size(self, raw: torch.Tensor, name: str, pos_embed_max_size: int | None) -> None:
        """Raise a ValueError naming `name` when the latent's sides exceed the DiT's position-embedding grid.

        The DiT crops its absolute position embedding (pos_embed_max_size patches per side) for the target and for
        the reference alike, so neither may exceed pos_embed_max_size * patch latent pixels per side.
        """
        if pos_embed_max_size is None:
            return
        height, width = raw.shape[-2:]
        limit = pos_embed_max_size * self.patch
        if max(height, width) > limit:
            f = self.vae_factor
            raise ValueError(
                f"{name} is {width}x{height} latent pixels ({width * f}x{height * f} px); the DiT's position grid "
                f"allows at most {limit} latent pixels per side ({limit * f} px) -- use a smaller size (Empty "
                "Latent Image, or a lower longer_edge in UniPic2 Edit Reference)")


SD3 = LatentSpace()
