"""CONDITIONING <-> the DiT's prompt embeddings and reference latents.

ComfyUI's SD3 shape: [[tokens [B, L, D_joint], {"pooled_output": [B, D_pooled], "reference_latents": [raw latents]}]],
the same keys native CLIPTextEncode (SD3) and ReferenceLatent use, so our nodes and theirs interoperate. Several
entries (Conditioning Combine) with timestep ranges (Conditioning Set Timestep Range) become a prompt schedule.
"""

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..unipic_core.images import check_finite, check_latent
from ..unipic_core.sampling import Prompt, PromptEmbeds, TimedPrompt

log = logging.getLogger("unipic2")

NODE = "UniPic2 Sampler"

# Native conditioning features the sampler cannot honour, and what to do instead; never silently ignored.
REFUSED_KEYS = {
    "area": "area conditioning (Conditioning Set Area) -- remove that node; UniPic2 conditions the whole image",
    "mask": "mask conditioning (Conditioning Set Mask) -- remove that node; to repaint a region, put Set Latent "
            "Noise Mask on the latent instead",
    "control": "a ControlNet (Apply ControlNet) -- remove that node; UniPic2 has no ControlNet",
    "gligen": "GLIGEN boxes (GLIGEN Textbox Apply) -- remove that node",
    "hooks": "hooks (Set CLIP Hooks / Cond Set Props) -- remove them; load LoRAs with UniPic2 Apply LoRA instead",
}
TOKENS_CAUSE = "the text encoder or MetaQuery Encode; a model run in fp16 can overflow -- try bf16 or fp32"
REFERENCE_CAUSE = "UniPic2 Edit Reference / ReferenceLatent, or the VAE Encode of a broken image"


def to_conditioning(embeds: PromptEmbeds) -> list:
    return [[embeds.tokens, {"pooled_output": embeds.pooled}]]


def with_reference(conditioning: list, raw_latent: torch.Tensor) -> list:
    """A copy of `conditioning` with one more raw-space reference latent appended (as native ReferenceLatent)."""
    return [[tokens, {**extras, "reference_latents": list(extras.get("reference_latents", [])) + [raw_latent]}]
            for tokens, extras in conditioning]


def prompt_schedule(conditioning: list, name: str, config, batch: int, step_sigmas: torch.Tensor,
                    percent_to_sigma: Callable[[float], float]) -> Prompt:
    """A CONDITIONING as the sampler's prompt: one entry -> PromptEmbeds; several -> a TimedPrompt schedule.

    config: the DiT's config (widths); batch: the latent batch; step_sigmas: the sigma of every step, which the
    entries' timestep ranges must cover together; percent_to_sigma: the sampler's shifted schedule.
    """
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{NODE}: '{name}' has no entries -- connect a UniPic2 Text Encode or a CLIPTextEncode")
    schedule = [_timed_prompt(entry, _where(name, i, len(conditioning)), config, batch, percent_to_sigma)
                for i, entry in enumerate(conditioning)]
    for step, sigma in enumerate(step_sigmas.tolist()):
        if not any(entry.active_at(sigma) for entry in schedule):
            raise ValueError(f"{NODE}: no entry of '{name}' covers step {step + 1} of {len(step_sigmas)} (sigma "
                             f"{sigma:.3f}) -- the timestep ranges (Conditioning Set Timestep Range) of the combined "
                             "entries must together cover 0 to 1")
    return schedule[0].embeds if len(schedule) == 1 else schedule  # one entry: the plain, batched-CFG path


def _where(name: str, index: int, count: int) -> str:
    return f"{NODE}: '{name}'" if count == 1 else f"{NODE}: '{name}' (entry {index + 1} of {count})"


def _timed_prompt(entry, where: str, config, batch: int, percent_to_sigma) -> TimedPrompt:
    tokens, extras = entry
    for key, refusal in REFUSED_KEYS.items():
        if extras.get(key) is not None:
            raise ValueError(f"{where} carries {refusal}")
    start = max(extras.get("start_percent", 0.0), extras.get("clip_start_percent", 0.0))  # as ComfyUI combines them
    end = min(extras.get("end_percent", 1.0), extras.get("clip_end_percent", 1.0))
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"{where} has the timestep range {start} to {end}, which no step falls in -- set start "
                         "below end, both within 0..1 (Conditioning Set Timestep Range)")
    strength = extras.get("strength", 1.0)
    if not (math.isfinite(strength) and strength > 0.0):
        raise ValueError(f"{where} has strength {strength} -- use a positive strength")
    return TimedPrompt(_prompt_embeds(tokens, extras, where, config, batch), percent_to_sigma(start),
                       percent_to_sigma(end), strength)


def _prompt_embeds(tokens: torch.Tensor, extras: dict, where: str, config, batch: int) -> PromptEmbeds:
    """One entry's tokens and pooled output, checked against the DiT's widths and the latent batch."""
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError(f"{where} has no pooled output; encode it with UniPic2 Text Encode or an SD3 CLIP "
                         "(TripleCLIPLoader + CLIPTextEncode)")
    joint_dim, pooled_dim = config.joint_attention_dim, config.pooled_projection_dim
    if tokens.shape[-1] != joint_dim or pooled.shape[-1] != pooled_dim:
        raise ValueError(f"{where} has width {tokens.shape[-1]} / pooled {pooled.shape[-1]}, the model expects "
                         f"{joint_dim} / {pooled_dim} -- use the text encoders of the same checkpoint")
    if tokens.shape[0] not in (1, batch) or pooled.shape[0] != tokens.shape[0]:
        raise ValueError(f"{where} has batch {tokens.shape[0]} (pooled {pooled.shape[0]}) for a latent batch of "
                         f"{batch} -- use one prompt for all images, or one per image")
    check_finite(tokens, f"{where} tokens", TOKENS_CAUSE)
    check_finite(pooled, f"{where} pooled_output", TOKENS_CAUSE)
    return PromptEmbeds(tokens.float(), pooled.float())


def attached_references(entries: list[dict], node: str) -> list[torch.Tensor]:
    """The distinct raw reference latents attached to conditioning entries (their extras dicts): the same latent
    carried by several entries (Conditioning Combine) counts once; an entry carrying two is refused."""
    references = []
    for extras in entries:
        attached = extras.get("reference_latents") or []
        if len(attached) > 1:
            raise ValueError(f"{node}: {len(attached)} reference latents are attached; UniPic2-Kontext takes one "
                             "reference image -- remove the extra Edit Reference / ReferenceLatent node")
        references += [r for r in attached if not any(r is seen for seen in references)]
    return references


def reference_latent(positive: list, negative: list) -> torch.Tensor | None:
    """The raw reference latent attached to the conditioning (positive first), or None for text-to-image.

    One reference for all entries: Conditioning Combine of entries that carry the same latent is fine.
    """
    for name, conditioning in (("positive", positive), ("negative", negative)):
        references = attached_references([extras for _, extras in conditioning], NODE)
        if len(references) > 1:
            raise ValueError(f"{NODE}: the entries of '{name}' carry {len(references)} different reference "
                             "latents; UniPic2-Kontext takes one reference image -- attach it once, after "
                             "Conditioning Combine")
        if references:
            check_latent(references[0], f"{NODE}: the reference latent in '{name}'", REFERENCE_CAUSE)
            return references[0]
    return None


def reference_at_target(reference: torch.Tensor, target: torch.Size, node: str, warned_sizes: set) -> torch.Tensor:
    """A raw reference latent checked against the target latent's shape [B, C, H, W] and resized to its size (the
    size UniPic2-Kontext was trained on), with a warning once per size pair recorded in `warned_sizes`."""
    batch, channels, height, width = target
    if reference.shape[1] != channels:
        raise ValueError(f"{node}: the reference latent has {reference.shape[1]} channels, the model needs "
                         f"{channels} -- encode the image with an SD3 VAE")
    if reference.shape[0] not in (1, batch):
        raise ValueError(f"{node}: reference batch {reference.shape[0]} does not match latent batch {batch}; use "
                         "one reference image or one per output")
    if reference.shape[-2:] != (height, width):
        sizes = (tuple(reference.shape[-2:]), (height, width))
        if sizes not in warned_sizes:
            warned_sizes.add(sizes)
            log.warning("%s: reference latent %s resized to the output latent %s; for best results encode the "
                        "reference at the output size (UniPic2 Edit Reference does)", node, *sizes)
        reference = F.interpolate(reference.float(), size=(height, width), mode="bilinear")
    return reference
