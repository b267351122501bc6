"""The pack's own graph types: loaded components wrapped for ComfyUI's memory manager."""

from dataclasses import dataclass

import torch
from comfy.model_patcher import ModelPatcher

from ..unipic_core.metaquery import MetaQueryMLLM
from ..unipic_core.text_encoding import SD3TextEncoders


@dataclass
class UniPic2Model:
    """UNIPIC2_MODEL: the Kontext DiT plus what sampling needs from its checkpoint."""

    patcher: ModelPatcher
    scheduler_config: dict
    vae_shift: float  # LATENTs travel in raw VAE space; the DiT sees (raw - shift) * scale
    vae_scale: float
    latent_rgb: torch.Tensor  # [C + 1, 3] map for step previews
    name: str = ""  # the checkpoint folder's name: LoRAs record it and resuming checks it

    @property
    def transformer(self):
        return self.patcher.model.module


@dataclass
class UniPic2Text:
    """UNIPIC2_TEXT: CLIP-L, CLIP-G and T5, one ModelPatcher each so ComfyUI can offload T5 alone."""

    encoders: SD3TextEncoders
    patchers: list[ModelPatcher]


@dataclass
class UniPic2VAE:
    """UNIPIC2_VAE: the SD3 AutoencoderKL."""

    patcher: ModelPatcher

    @property
    def vae(self):
        return self.patcher.model.module


@dataclass
class UniPic2MLLM:
    """UNIPIC2_MLLM: Qwen2.5-VL + processor + MetaQuery conditioner, the MLLM and the conditioner in their own
    ModelPatchers so ComfyUI can offload the 7B MLLM before sampling."""

    encoder: MetaQueryMLLM
    mllm_patcher: ModelPatcher
    conditioner_patcher: ModelPatcher
