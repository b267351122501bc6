"""UniPic2-Kontext's reference image on a native ComfyUI SD3 MODEL (Load Diffusion Model, fp8, LoRA loaders...).

ComfyUI's SD3 model drops `reference_latents` (its `extra_conds` knows only the text). UniPic2-Kontext differs from
SD3.5-M at exactly one point: the reference latent goes through the same patch embedding and the same cropped
position embedding as the target, its tokens are prepended, every block runs on the joint sequence and only the
last H*W tokens leave the model. `with_kontext_reference` adds that to a clone through ModelPatcher's own
mechanisms (object patches and a keyed wrapper), so samplers, LoRA patches, fp8 casting and partial loading apply
unchanged.
"""

import logging

import comfy.conds
import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import torch

from ...unipic_core.inference.latents import SD3
from .conditioning import attached_references, reference_at_target

log = logging.getLogger("unipic2")

NODE = "UniPic2 Kontext Reference"
WRAPPER_KEY = "unipic2_kontext"
REFERENCE_COND = "unipic2_ref"  # the model-space reference, as a model cond (what the MMDiT forward receives)
REFERENCE_CAUSE = "a VAE Encode of a broken image"


def with_kontext_reference(model):
    """A clone of a native SD3 ModelPatcher whose conditioning's reference latent edits, as UniPic2-Kontext.

    Without a reference in the conditioning the clone computes exactly what `model` computes. Applying it to a
    model that already has it returns a plain clone.
    """
    if not isinstance(model.model, comfy.model_base.SD3):
        raise ValueError(f"{NODE}: 'model' is a {type(model.model).__name__} model; it needs an SD3 / SD3.5 MMDiT "
                         "-- load the UniPic2-Kontext transformer with Load Diffusion Model or Load UniPic2 Kontext")
    patched = model.clone()
    if has_kontext_reference(patched):
        return patched
    patched.add_object_patch("extra_conds", _extra_conds_with_reference(patched))
    patched.add_object_patch("memory_usage_factor_conds",
                             (*patched.get_model_object("memory_usage_factor_conds"), REFERENCE_COND))
    patched.add_object_patch("diffusion_model.forward",
                             _forward_with_reference(patched.get_model_object("diffusion_model"),
                                                     patched.get_model_object("diffusion_model.forward")))
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, _share_reference)
    return patched


def has_kontext_reference(model) -> bool:
    """Whether with_kontext_reference was applied to this ModelPatcher (or one it was cloned from)."""
    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY))


def _extra_conds_with_reference(patched):
    """The model's extra_conds (chained, whatever patched it before) plus the reference in model space."""
    base_extra_conds = patched.get_model_object("extra_conds")
    warned_sizes = set()

    def extra_conds(**kwargs):
        out = base_extra_conds(**kwargs)
        references = kwargs.get("reference_latents")
        if references:
            (reference,) = references  # _share_reference refused more
            SD3.check_latent(reference, f"{NODE}: the reference latent", REFERENCE_CAUSE)
            reference = reference_at_target(reference, kwargs["noise"].shape, NODE, warned_sizes)
            # raw VAE latent -> model space, once (the sampler does the same to the target latent)
            out[REFERENCE_COND] = comfy.conds.CONDNoiseShape(patched.model.process_latent_in(reference))
        return out

    return extra_conds


def _forward_with_reference(dit, plain_forward):
    """The MMDiT forward with the reference tokens prepended; without a reference, the previous forward unchanged.

    Built from the MMDiT's own submodules, so every weight is used through ComfyUI's ops (fp8 casting, lowvram,
    LoRA patches) and block replacements / attention overrides in transformer_options still apply. final_layer
    works token by token, so keeping the last H*W tokens after it equals keeping them before it.
    """
    def forward(x, timesteps, context=None, y=None, control=None, transformer_options={}, unipic2_ref=None,
                **kwargs):
        if unipic2_ref is None:
            return plain_forward(x, timesteps, context=context, y=y, control=control,
                                 transformer_options=transformer_options, **kwargs)
        hw = x.shape[-2:]
        position = comfy.ops.cast_to_input(dit.cropped_pos_embed(hw, device=x.device), x)  # one grid for both
        reference = dit.x_embedder(unipic2_ref) + position
        target = dit.x_embedder(x) + position
        c = dit.t_embedder(timesteps, dtype=x.dtype)
        if y is not None and dit.y_embedder is not None:
            c = c + dit.y_embedder(y)
        if dit.context_processor is not None:
            context = dit.context_processor(context)
        if context is not None:
            context = dit.context_embedder(context)
        out = dit.forward_core_with_concat(torch.cat([reference, target], dim=1), c, context, control,
                                           transformer_options)
        return dit.unpatchify(out[:, reference.shape[1]:], hw=hw)[:, :, :hw[-2], :hw[-1]]

    return forward


def _share_reference(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: one reference for every conditioning entry, and memory planned for its tokens.

    The official pipeline runs the negative with the positive's reference; a native graph usually attaches it to
    the positive only, so entries without one get it here (new dicts: the user's conditioning stays untouched).
    """
    entries = [entry for entries in conds.values() for entry in entries]
    references = attached_references(entries, NODE)
    if not references:
        return executor(model, noise_shape, conds, *args, **kwargs)
    if any(entry.get("control") is not None for entry in entries):
        raise ValueError(f"{NODE}: a ControlNet together with a reference image is not supported -- remove the "
                         "Apply ControlNet node or the reference (ReferenceLatent / UniPic2 Edit Reference)")
    if any(not entry.get("reference_latents") for entry in entries):
        if len(references) > 1:
            raise ValueError(f"{NODE}: the conditioning entries carry {len(references)} different reference "
                             "latents and some carry none; UniPic2-Kontext takes one reference image -- attach it "
                             "once, after Conditioning Combine")
        log.info("%s: conditioning without a reference latent (usually the negative) uses the positive's, as "
                 "the official pipeline does", NODE)
        conds = {name: [entry if entry.get("reference_latents") else {**entry, "reference_latents": references}
                        for entry in entries]
                 for name, entries in conds.items()}
    # ComfyUI sizes the weight offload from noise_shape before the model (and so our memory_usage_factor_conds
    # patch) is loaded; its estimate is linear in the latent area, so a target twice as tall counts the
    # reference's tokens exactly.
    noise_shape = [*noise_shape[:-2], 2 * noise_shape[-2], noise_shape[-1]]
    return executor(model, noise_shape, conds, *args, **kwargs)
