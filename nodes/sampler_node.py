"""UniPic2 Sampler: flow-matching denoising with the Kontext DiT, with or without a reference image."""

import logging

import torch
import torch.nn.functional as F

from ..unipic_core import images
from ..unipic_core.sampling import SAMPLERS, resize_noise_mask, sample
from ..unipic_core.schedule import denoise_sigmas, percent_to_sigma
from . import host
from .conditioning import prompt_schedule, reference_at_target, reference_latent

log = logging.getLogger("unipic2")

LATENT_CAUSE = "a VAE Encode of a broken image, or a failed earlier sampler"


def _grid_latent(raw: torch.Tensor, patch: int) -> torch.Tensor:
    """The latent resized to the DiT's patch grid when its sides are not multiples of the patch size."""
    height, width = raw.shape[-2:]
    grid_h, grid_w = (max(patch, round(s / patch) * patch) for s in (height, width))
    if (grid_h, grid_w) == (height, width):
        return raw
    log.warning("UniPic2 Sampler: latent %dx%d resized to %dx%d (sides must be multiples of %d latent pixels, "
                "i.e. images a multiple of %d px)", width, height, grid_w, grid_h, patch, patch * images.LATENT_TO_IMAGE)
    return F.interpolate(raw.float(), size=(grid_h, grid_w), mode="bilinear", align_corners=False)


class UniPic2Sampler:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("Denoises a latent with UniPic2-Kontext. A reference latent in the conditioning (UniPic2 Edit "
                   "Reference or native ReferenceLatent) makes it an edit; otherwise it is text-to-image. Honours a "
                   "latent's noise mask (Set Latent Noise Mask: inpainting) and timestep ranges (Conditioning Set "
                   "Timestep Range + Conditioning Combine: switch prompts during sampling), as KSampler does.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("UNIPIC2_MODEL", {"tooltip": "From Load UniPic2 Kontext."}),
            "positive": ("CONDITIONING", {"tooltip": "Prompt or edit instruction (UniPic2 Text Encode, or SD3 "
                                          "CLIPTextEncode); may carry the reference image, and several prompts "
                                          "with timestep ranges."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative prompt, used when guidance > 1."}),
            "latent": ("LATENT", {"tooltip": "Sets the output size (and batch); with denoise < 1 also the start. With "
                                  "a noise mask, only where the mask is 1 is regenerated; the rest is kept."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "tooltip": "Noise seed; the same "
                             "seed gives the same image on any device."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps (official: 50)."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free "
                                   "guidance scale (official: 3.5); 1 skips the negative pass."}),
            "sampler": (list(SAMPLERS), {"default": "euler", "tooltip": "euler: deterministic ODE. flow-sde: the "
                                         "Flow-GRPO stochastic sampler, noise set by noise_level."}),
            "noise_level": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "flow-sde "
                                      "only: SDE noise scale a (paper: 0.7); 0 equals euler."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Timestep shift; "
                                "0 uses the checkpoint's scheduler config (3.0 for UniPic2-Kontext)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Below 1, "
                                  "starts from the input latent noised to that level (img2img)."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, guidance, sampler, noise_level, shift, denoise):
        config = model.transformer.config
        raw = latent["samples"]
        images.check_latent(raw, "UniPic2 Sampler: 'latent'", LATENT_CAUSE)
        raw = _grid_latent(raw, config.patch_size)
        images.check_grid_size(raw, "UniPic2 Sampler: 'latent'", config.patch_size, config.pos_embed_max_size)
        batch, channels, height, width = raw.shape
        if channels != config.in_channels:
            if denoise < 1.0:
                raise ValueError(f"UniPic2 Sampler: 'latent' has {channels} channels; img2img (denoise < 1) needs "
                                 f"a {config.in_channels}-channel SD3 latent from UniPic2 VAE Encode")
            raw = raw.new_zeros(batch, config.in_channels, height, width)  # an empty latent only sets the size

        schedule_config = dict(model.scheduler_config)
        if shift > 0:
            schedule_config.update(shift=shift, use_dynamic_shifting=False)
        tokens = (height // config.patch_size) * (width // config.patch_size)
        sigmas = denoise_sigmas(steps, denoise, schedule_config, image_seq_len=tokens)
        to_sigma = (lambda percent: percent_to_sigma(percent, schedule_config, tokens))
        pos = prompt_schedule(positive, "positive", config, batch, sigmas[:-1], to_sigma)
        neg = prompt_schedule(negative, "negative", config, batch, sigmas[:-1], to_sigma)

        reference = _model_space_reference(positive, negative, model, raw.shape)
        mask = _noise_mask(latent, batch, height, width)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(raw.shape, generator=generator, dtype=torch.float32)
        keeps_input = denoise < 1.0 or mask is not None
        start = images.raw_to_model(raw, model.vae_shift, model.vae_scale) if keeps_input else None

        (transformer,) = host.load_on_device(model.patcher)
        device = transformer.device
        progress = host.StepProgress(len(sigmas) - 1)

        def on_step(i, total, x, x0):
            host.check_cancel()
            preview = images.latent_preview(images.model_to_raw(x0[0], model.vae_shift, model.vae_scale).cpu(),
                                            model.latent_rgb)
            progress.update(i + 1, total, preview)

        move = (lambda t: None if t is None else t.to(device))
        with torch.no_grad():
            x = sample(transformer, noise.to(device), sigmas, pos, neg, guidance=guidance, reference=move(reference),
                       sampler=sampler, noise_level=noise_level, generator=generator, start_latent=move(start),
                       noise_mask=move(mask), on_step=on_step)
        return ({"samples": images.model_to_raw(x, model.vae_shift, model.vae_scale).cpu()},)


def _model_space_reference(positive: list, negative: list, model, shape: torch.Size) -> torch.Tensor | None:
    """The conditioning's reference latent in model space at the output latent's size, or None (text-to-image).

    Resizing it to the output also keeps it within the DiT's position grid, which the output was checked against.
    """
    reference = reference_latent(positive, negative)
    if reference is None:
        return None
    reference = reference_at_target(reference, shape, "UniPic2 Sampler", warned_sizes=set())
    return images.raw_to_model(reference, model.vae_shift, model.vae_scale)  # GuidedVelocity expands it


def _noise_mask(latent: dict, batch: int, height: int, width: int) -> torch.Tensor | None:
    """The LATENT's noise_mask (Set Latent Noise Mask, VAE Encode for Inpaint) at the latent's size, or None."""
    mask = latent.get("noise_mask")
    if mask is None:
        return None
    name = "UniPic2 Sampler: the noise mask of 'latent'"
    if mask.ndim < 2 or mask.numel() == 0:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected a MASK [batch, height, width] -- check "
                         "the Set Latent Noise Mask node")
    images.check_finite(mask, name, "the MASK given to Set Latent Noise Mask")
    mask = resize_noise_mask(mask, height, width)
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} has batch {mask.shape[0]} for a latent batch of {batch} -- use one mask for all "
                         "images, or one per image")
    return mask
