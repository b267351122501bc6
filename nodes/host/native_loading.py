"""A UniPic2 folder's DiT and VAE as native ComfyUI objects, built by ComfyUI's own loaders.

The DiT goes through `comfy.sd.load_diffusion_model_state_dict` (what Load Diffusion Model does: fp8 weight
dtypes, partial loading and LoRA loaders then apply), gains the Kontext reference ability and the checkpoint's
shift as a model_sampling patch (what ModelSamplingSD3 does). The VAE is a `comfy.sd.VAE` built with an explicit
config read from vae/config.json, since ComfyUI's detection assumes the full-size SD VAE's widths.
"""

from pathlib import Path

import comfy.latent_formats
import comfy.model_base
import comfy.sd
import torch
from comfy.diffusers_convert import convert_vae_state_dict

from ...unipic_core.models.loading import CheckpointError, check_keys, read_json, read_transformer_weights, read_weights
from . import memory
from .native_kontext import with_kontext_reference

SUPPORTED_SCHEDULER_KEYS = "shift (static: use_dynamic_shifting false)"


def load_native_dit(folder: Path, scheduler_config: dict, model_options: dict):
    """transformer/ -> a native SD3 ModelPatcher that edits as UniPic2-Kontext, shifted as the scheduler says.

    model_options: Load Diffusion Model's ({"dtype": ..., "fp8_optimizations": ...}); empty lets ComfyUI pick.
    """
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    component = folder / "transformer"
    weights = read_transformer_weights(folder)  # strict official keys: ComfyUI's loader would only log a mismatch
    fix = ("this folder is not a UniPic2-Kontext transformer (SD3.5-M's MMDiT, hidden size = 64 x depth); download "
           "the official transformer/ folder again")
    try:
        model = comfy.sd.load_diffusion_model_state_dict(weights, model_options=dict(model_options))
    except (RuntimeError, ValueError, KeyError) as err:  # detected from widths, then the weights did not fit
        raise CheckpointError(f"{component}: ComfyUI detects no SD3 / SD3.5 MMDiT it can load in "
                              f"diffusion_pytorch_model*.safetensors ({str(err).splitlines()[0]}) -- {fix}") from err
    if model is None or not isinstance(model.model, comfy.model_base.SD3):
        kind = "no model ComfyUI knows" if model is None else f"a {type(model.model).__name__} model"
        raise CheckpointError(f"{component}: ComfyUI detects {kind} in diffusion_pytorch_model*.safetensors, not an "
                              f"SD3 / SD3.5 MMDiT -- {fix}")
    if scheduler_config.get("use_dynamic_shifting"):
        raise CheckpointError(f"{folder / 'scheduler' / 'scheduler_config.json'} enables use_dynamic_shifting; "
                              f"UniPic2 supports {SUPPORTED_SCHEDULER_KEYS} -- use the official scheduler config")
    (model,) = ModelSamplingSD3().patch(with_kontext_reference(model), float(scheduler_config.get("shift", 1.0)))
    memory.record_checkpoint(model, folder.name)
    return model


def comfy_vae_config(config: dict) -> dict:
    """vae/config.json (diffusers AutoencoderKL) -> comfy.sd.VAE's `config` (ComfyUI's AutoencoderKL params)."""
    widths = list(config["block_out_channels"])
    if any(width % 32 for width in widths) or config.get("norm_num_groups", 32) != 32:
        raise ValueError(f"block_out_channels {widths} / norm_num_groups {config.get('norm_num_groups')}: ComfyUI's "
                         "VAE needs widths that are multiples of 32 with 32 norm groups (SD3's VAE has them)")
    latent = config["latent_channels"]
    return {"params": {"embed_dim": latent, "ddconfig": {
        "double_z": True, "z_channels": latent, "resolution": config.get("sample_size", 256),
        "in_channels": config.get("in_channels", 3), "out_ch": config.get("out_channels", 3), "ch": widths[0],
        "ch_mult": [width // widths[0] for width in widths], "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [], "dropout": 0.0}}}


def identity_quant_convs(latent_channels: int) -> dict[str, torch.Tensor]:
    """ComfyUI's AutoencoderKL always has quant_conv / post_quant_conv; SD3's VAE has none (use_quant_conv false),
    which 1x1 identity convolutions reproduce exactly."""
    def identity(channels):
        return torch.eye(channels)[:, :, None, None]

    return {"quant_conv.weight": identity(2 * latent_channels), "quant_conv.bias": torch.zeros(2 * latent_channels),
            "post_quant_conv.weight": identity(latent_channels), "post_quant_conv.bias": torch.zeros(latent_channels)}


def load_native_vae(folder: Path, dtype: torch.dtype | None = None) -> comfy.sd.VAE:
    """vae/ -> a native VAE whose latents are raw SD3 latents (what VAE Encode / VAE Decode use).

    dtype None lets ComfyUI pick, as VAELoader does.
    """
    component = folder / "vae"
    config = read_json(component / "config.json")
    sd3 = comfy.latent_formats.SD3()
    scaling, shift = config.get("scaling_factor"), config.get("shift_factor") or 0.0
    if (scaling, shift, config.get("latent_channels")) != (sd3.scale_factor, sd3.shift_factor, sd3.latent_channels):
        raise CheckpointError(f"{component / 'config.json'}: scaling_factor {scaling}, shift_factor {shift}, "
                              f"latent_channels {config.get('latent_channels')}; UniPic2's DiT reads SD3 latents "
                              f"({sd3.scale_factor}, {sd3.shift_factor}, {sd3.latent_channels}) -- use the "
                              "checkpoint's own SD3 VAE")
    if config.get("use_quant_conv", True) or config.get("use_post_quant_conv", True):
        raise CheckpointError(f"{component / 'config.json'}: a VAE with quant_conv layers is not SD3's VAE -- use "
                              "the checkpoint's own SD3 VAE")
    try:
        comfy_config = comfy_vae_config(config)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{component / 'config.json'}: {err}") from err
    weights = convert_vae_state_dict(read_weights(component))  # diffusers keys -> ComfyUI's
    weights.update(identity_quant_convs(config["latent_channels"]))
    vae = comfy.sd.VAE(sd=weights, config=comfy_config, dtype=dtype)
    check_keys(component, set(vae.first_stage_model.state_dict()), set(weights))
    vae.latent_channels = config["latent_channels"]  # the config path leaves ComfyUI's default of 4
    return vae
