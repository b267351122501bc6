"""CONDITIONING <-> the DiT's prompt embeddings and reference latents.

ComfyUI's SD3 shape: [[tokens [B, L, D_joint], {"pooled_output": [B, D_pooled], "reference_latents": [raw latents]}]],
the same keys native CLIPTextEncode (SD3) and ReferenceLatent use, so our nodes and theirs interoperate. Timestep
ranges, areas, masks and strengths of the entries are ComfyUI's own business: its sampling honours them. A reference
image is sized by the size policy that Edit Reference and MetaQuery Encode both offer (SIZE_INPUTS).
"""

import logging

import torch
import torch.nn.functional as F

from ...unipic_core.inference import images
from ...unipic_core.inference.images import check_finite
from ...unipic_core.inference.sampling import PromptEmbeds

log = logging.getLogger("unipic2")

TOKENS_CAUSE = "the text encoder or MetaQuery Encode; a model run in fp16 can overflow -- try bf16 or fp32"


def to_conditioning(embeds: PromptEmbeds) -> list:
    return [[embeds.tokens, {"pooled_output": embeds.pooled}]]


def with_reference(conditioning: list, raw_latent: torch.Tensor) -> list:
    """A copy of `conditioning` with one more raw-space reference latent appended (as native ReferenceLatent)."""
    return [[tokens, {**extras, "reference_latents": list(extras.get("reference_latents", [])) + [raw_latent]}]
            for tokens, extras in conditioning]


def carries_reference(*conditionings) -> bool:
    """True when an entry of these CONDITIONINGs carries a reference latent (malformed ones: False, as their own
    check_conditioning names them)."""
    return any(isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)
               and entry[1].get("reference_latents")
               for conditioning in conditionings if isinstance(conditioning, list) for entry in conditioning)


def check_conditioning(conditioning: list, node: str, name: str, widths: tuple[int, int], batch: int) -> None:
    """Every entry of a CONDITIONING checked against the DiT's (joint, pooled) widths and the latent batch, and for
    NaN; the error names the input, the entry and the fix."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{node}: '{name}' has no entries -- connect a UniPic2 Text Encode or a CLIPTextEncode")
    for index, (tokens, extras) in enumerate(conditioning):
        where = f"{node}: '{name}'" if len(conditioning) == 1 else \
            f"{node}: '{name}' (entry {index + 1} of {len(conditioning)})"
        pooled = extras.get("pooled_output")
        if pooled is None:
            raise ValueError(f"{where} has no pooled output; encode it with UniPic2 Text Encode or an SD3 CLIP "
                             "(TripleCLIPLoader + CLIPTextEncode)")
        joint_dim, pooled_dim = widths
        if tokens.shape[-1] != joint_dim or pooled.shape[-1] != pooled_dim:
            raise ValueError(f"{where} has width {tokens.shape[-1]} / pooled {pooled.shape[-1]}, the model expects "
                             f"{joint_dim} / {pooled_dim} -- use the text encoders of the same checkpoint")
        if tokens.shape[0] not in (1, batch) or pooled.shape[0] != tokens.shape[0]:
            raise ValueError(f"{where} has batch {tokens.shape[0]} (pooled {pooled.shape[0]}) for a latent batch of "
                             f"{batch} -- use one prompt for all images, or one per image")
        check_finite(tokens, f"{where} tokens", TOKENS_CAUSE)
        check_finite(pooled, f"{where} pooled_output", TOKENS_CAUSE)


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


SIZE_INPUTS = {
    "size_policy": (["longer edge", "keep size"], {"default": "longer edge", "tooltip": "longer edge: scale so the "
                    "longer side is 'longer_edge' (official: 512). keep size: only round to the grid."}),
    "longer_edge": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip": "Target length of the "
                            "longer side with the 'longer edge' policy."}),
    "multiple_of": ("INT", {"default": 32, "min": 16, "max": 128, "step": 16, "tooltip": "Both sides are rounded to "
                            "a multiple of this (16 is the DiT's patch grid; official: 32)."}),
}


def sized_image(image, node: str, name: str, size_policy: str, longer_edge: int, multiple_of: int):
    """The IMAGE resized by the size policy (the official editing scripts' rule by default); says when it resized."""
    images.check_image(image, f"{node}: '{name}'")
    height, width = image.shape[1:3]
    if size_policy == "longer edge":
        edge = images.round_to_multiple(longer_edge, multiple_of)
        new_w, new_h = images.longer_edge_size(width, height, edge, multiple_of)
    else:
        new_w, new_h = (images.round_to_multiple(side, multiple_of) for side in (width, height))
    if (new_w, new_h) != (width, height):
        log.warning("%s: '%s' resized from %dx%d to %dx%d (%s, multiple of %d)", node, name, width, height,
                    new_w, new_h, size_policy, multiple_of)
    return images.resize_image(image, new_w, new_h)


def attach_reference(vae, image, positive, negative):
    """Both conditionings with the image's raw VAE latent (native VAE Encode's) attached, and the empty LATENT of
    the same size."""
    raw = vae.encode(image[..., :3]).float()
    return with_reference(positive, raw), with_reference(negative, raw), {"samples": raw.new_zeros(raw.shape)}
