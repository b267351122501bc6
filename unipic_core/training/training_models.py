"""The loop's TrainingModels, and building them from loaded components (Kontext text encoders or the MetaQuery MLLM).

Each component comes through a `*_on_device()` callable: the node passes ComfyUI's memory manager (which may
move the 7B MLLM out while the DiT trains), a plain script passes components it already placed.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..inference.images import vae_decode, vae_encode
from ..inference.latents import LatentSpace
from ..inference.sampling import PromptEmbeds
from ..models.dit import DiffusersDiT, TrainableDiT
from ..models.loading import KontextComponents, MetaQueryComponents
from ..models.metaquery import MetaQueryMLLM, encode_metaquery
from ..models.text_encoding import SD3TextEncoders, encode_prompts


@dataclass
class TrainingModels:
    """What the loop needs from the loaded components; the node wires these through ComfyUI's memory manager."""

    dit: Callable[[], TrainableDiT]  # the DiT (adapter inside) placed on the compute device
    condition: Callable[[list[str], list[torch.Tensor | None]], tuple[PromptEmbeds, PromptEmbeds | None]]
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # IMAGE [1, H, W, 3] -> model-space latent [1, C, h, w]
    decode: Callable[[torch.Tensor], torch.Tensor]  # model-space latents [N, C, h, w] -> IMAGE [N, H, W, 3]
    scheduler_config: dict
    latents: LatentSpace  # the VAE's and DiT's conventions: latent shape and DiT tokens of an image size
    device: torch.device
    base_model: str = ""


def text_condition(encoders_on_device: Callable[[], SD3TextEncoders], negative_prompt: str):
    negative = None  # the same every step: encoded once

    def condition(prompts: list[str], sources: list) -> tuple[PromptEmbeds, PromptEmbeds]:
        nonlocal negative
        encoders = encoders_on_device()
        if negative is None:
            negative = encode_prompts(encoders, [negative_prompt])
        return encode_prompts(encoders, prompts), negative

    return condition


def metaquery_condition(mllm_on_device: Callable[[], MetaQueryMLLM], negative_prompt: str):
    """Text-to-image: prompts batched; editing: each source goes to the MLLM with its instruction and the negative."""
    text_negative = None  # text-to-image: the same every step, encoded once

    def condition(prompts: list[str], sources: list) -> tuple[PromptEmbeds, PromptEmbeds]:
        nonlocal text_negative
        encoder = mllm_on_device()
        if sources[0] is None:
            if text_negative is None:
                text_negative = encode_metaquery(encoder, [negative_prompt])
            return encode_metaquery(encoder, prompts), text_negative
        rows = [encode_metaquery(encoder, [prompt, negative_prompt], [source])
                for prompt, source in zip(prompts, sources)]
        side = lambda i: PromptEmbeds(torch.cat([r.tokens[i:i + 1] for r in rows]),
                                      torch.cat([r.pooled[i:i + 1] for r in rows]))
        return side(0), side(1)

    return condition


def training_models(dit_on_device: Callable[[], TrainableDiT], vae_on_device: Callable[[], torch.nn.Module],
                    condition, scheduler_config: dict, device: torch.device, base_model: str) -> TrainingModels:
    vae = vae_on_device()
    space = LatentSpace.from_vae_config(vae.config)
    return TrainingModels(
        dit=dit_on_device,
        condition=condition,
        encode_image=lambda image: space.to_model(vae_encode(vae_on_device(), image)).to(device),
        decode=lambda latents: vae_decode(vae_on_device(), space.to_raw(latents)),
        scheduler_config=scheduler_config,
        latents=space,
        device=device,
        base_model=base_model,
    )


def models_on_device(components: KontextComponents | MetaQueryComponents, folder: str | Path,
                     device: torch.device, negative_prompt: str = "") -> TrainingModels:
    """Everything moved to `device` once (a plain script or torchrun, without ComfyUI)."""
    components.transformer.to(device)
    components.vae.to(device)
    if isinstance(components, KontextComponents):
        for module in components.text_encoders.modules():
            module.to(device)
        components.text_encoders.device = device
        condition = text_condition(lambda: components.text_encoders, negative_prompt)
    else:
        components.mllm.mllm.to(device)
        components.mllm.conditioner.to(device)
        components.mllm.device = device
        condition = metaquery_condition(lambda: components.mllm, negative_prompt)
    dit = DiffusersDiT(components.transformer)
    return training_models(lambda: dit, lambda: components.vae, condition,
                           components.scheduler_config, device, Path(folder).name)
