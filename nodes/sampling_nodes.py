"""UniPic2 Sampler: the official schedule and the paper's samplers on a native MODEL, through ComfyUI's sampling."""

import logging

import comfy.model_base
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
import torch.nn.functional as F

from ..unipic_core import images
from ..unipic_core.sampling import SAMPLERS
from .host import progress
from .host.conditioning import carries_reference, check_conditioning
from .host.native_kontext import has_kontext_reference, with_kontext_reference
from .host.native_sampling import FlowSDESampler, official_sigmas, sample_flow_sde

log = logging.getLogger("unipic2")

NODE = "UniPic2 Sampler"
LATENT_CAUSE = "a VAE Encode of a broken image, or a failed earlier sampler"


def _grid_latent(raw: torch.Tensor, patch: int) -> torch.Tensor:
    """The latent resized to the DiT's patch grid when its sides are not multiples of the patch size."""
    height, width = raw.shape[-2:]
    grid_h, grid_w = (max(patch, round(s / patch) * patch) for s in (height, width))
    if (grid_h, grid_w) == (height, width):
        return raw
    log.warning("%s: latent %dx%d resized to %dx%d (sides must be multiples of %d latent pixels, i.e. images a "
                "multiple of %d px)", NODE, width, height, grid_w, grid_h, patch, patch * images.LATENT_TO_IMAGE)
    return F.interpolate(raw, size=(grid_h, grid_w), mode="bilinear", align_corners=False)


def sampling_model(model, shift: float, has_reference: bool):
    """The MODEL to sample with: refused unless it is an SD3 MMDiT (UniPic2-Kontext is one), shifted the
    ModelSamplingSD3 way when shift > 0, and given the reference ability when a reference is attached but the
    model (e.g. from Load Diffusion Model) lacks it."""
    if not isinstance(model.model, comfy.model_base.SD3):
        raise ValueError(f"{NODE}: 'model' is a {type(model.model).__name__} model; UniPic2 Sampler runs "
                         "UniPic2-Kontext (an SD3 / SD3.5 MMDiT) -- load it with Load UniPic2 Kontext, or use "
                         "KSampler for other models")
    if shift > 0:
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3

        (model,) = ModelSamplingSD3().patch(model, shift)
    if has_reference and not has_kontext_reference(model):
        model = with_kontext_reference(model)
    return model


class UniPic2Sampler:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("Denoises a latent with UniPic2-Kontext on the official schedule (exactly diffusers' "
                   "FlowMatchEulerDiscreteScheduler) with euler or the paper's flow-sde, through ComfyUI's own "
                   "sampling: model patches, LoRAs, noise masks (Set Latent Noise Mask), timestep ranges, areas "
                   "and masks of the conditioning apply as in KSampler. A reference latent in the conditioning "
                   "(UniPic2 Edit Reference or native ReferenceLatent) makes it an edit; otherwise it is "
                   "text-to-image.")
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "UniPic2-Kontext: from Load UniPic2 Kontext / MetaQuery, or Load "
                                "Diffusion Model on its transformer file (LoRAs and model patches included)."}),
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
                                "0 uses the model's (the checkpoint's scheduler config: 3.0 for UniPic2-Kontext, or "
                                "a ModelSamplingSD3 node's). Above 0 it replaces it, as ModelSamplingSD3 would."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Below 1, "
                                  "starts from the input latent noised to that level (img2img)."}),
        }}

    def sample(self, model, positive, negative, latent, seed, steps, guidance, sampler, noise_level, shift, denoise):
        model = sampling_model(model, shift, carries_reference(positive, negative))
        dit = model.get_model_object("diffusion_model")
        raw = latent["samples"]
        images.check_latent(raw, f"{NODE}: 'latent'", LATENT_CAUSE)
        raw = comfy.sample.fix_empty_latent_channels(model, raw.float())  # Empty Latent Image's 4 -> 16 channels
        channels = model.get_model_object("latent_format").latent_channels
        if raw.shape[1] != channels:
            raise ValueError(f"{NODE}: 'latent' has {raw.shape[1]} channels; the model needs a {channels}-channel "
                             "SD3 latent -- encode with the checkpoint's VAE (VAE Encode), or start from Empty "
                             "Latent Image")
        raw = _grid_latent(raw, dit.patch_size)
        images.check_grid_size(raw, f"{NODE}: 'latent'", dit.patch_size, dit.pos_embed_max_size)
        widths = (dit.context_embedder.in_features, dit.y_embedder.mlp[0].in_features)
        check_conditioning(positive, NODE, "positive", widths, raw.shape[0])
        check_conditioning(negative, NODE, "negative", widths, raw.shape[0])

        sigmas = official_sigmas(model, steps, denoise, NODE)
        if sampler == "euler":
            ksampler = comfy.samplers.ksampler("euler")
        else:  # its step noise continues the seed's stream after the initial noise, as the pack always drew it
            ksampler = FlowSDESampler(sample_flow_sde, {"noise_level": noise_level})
        noise = comfy.sample.prepare_noise(raw, seed, latent.get("batch_index"))  # CPU, as KSampler draws it
        samples = comfy.sample.sample_custom(
            model, noise, guidance, ksampler, sigmas, positive, negative, raw, noise_mask=latent.get("noise_mask"),
            callback=progress.sampling_callback(model, len(sigmas) - 1),
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        return ({**latent, "samples": samples},)
