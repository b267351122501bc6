"""CONDITIONING <-> the DiT's prompt embeddings and reference latents.

ComfyUI's SD3 shape: [[tokens [B, L, D_joint], {"pooled_output": [B, D_pooled], "reference_latents": [raw latents]}]],
the same keys native CLIPTextEncode (SD3) and ReferenceLatent use, so our nodes and theirs interoperate.
"""

import torch

from ..unipic_core.sampling import PromptEmbeds


def to_conditioning(embeds: PromptEmbeds) -> list:
    return [[embeds.tokens, {"pooled_output": embeds.pooled}]]


def with_reference(conditioning: list, raw_latent: torch.Tensor) -> list:
    """A copy of `conditioning` with one more raw-space reference latent appended (as native ReferenceLatent)."""
    return [[tokens, {**extras, "reference_latents": list(extras.get("reference_latents", [])) + [raw_latent]}]
            for tokens, extras in conditioning]


def prompt_embeds(conditioning: list, name: str, joint_dim: int, pooled_dim: int) -> PromptEmbeds:
    """The single entry of a CONDITIONING as PromptEmbeds, checked against the DiT's widths."""
    if not isinstance(conditioning, list) or len(conditioning) != 1:
        count = len(conditioning) if isinstance(conditioning, list) else "no"
        raise ValueError(f"UniPic2 Sampler: '{name}' has {count} entries; UniPic2 takes one text conditioning -- "
                         "connect a UniPic2 Text Encode (or one CLIPTextEncode) without Conditioning Combine")
    tokens, extras = conditioning[0]
    pooled = extras.get("pooled_output")
    if pooled is None:
        raise ValueError(f"UniPic2 Sampler: '{name}' has no pooled output; encode it with UniPic2 Text Encode or "
                         "an SD3 CLIP (TripleCLIPLoader + CLIPTextEncode)")
    if tokens.shape[-1] != joint_dim or pooled.shape[-1] != pooled_dim:
        raise ValueError(f"UniPic2 Sampler: '{name}' has width {tokens.shape[-1]} / pooled {pooled.shape[-1]}, the "
                         f"model expects {joint_dim} / {pooled_dim} -- use the text encoders of the same checkpoint")
    return PromptEmbeds(tokens.float(), pooled.float())


def reference_latent(positive: list, negative: list) -> torch.Tensor | None:
    """The raw reference latent attached to the conditioning (positive first), or None for text-to-image."""
    for conditioning in (positive, negative):
        references = conditioning[0][1].get("reference_latents") or []
        if len(references) > 1:
            raise ValueError(f"UniPic2 Sampler: {len(references)} reference latents are attached; UniPic2-Kontext "
                             "takes one reference image -- remove the extra Edit Reference / ReferenceLatent node")
        if references:
            return references[0]
    return None
