"""Memory that ComfyUI really manages: a UniPic2 DiT partially loaded (lowvram) computes what a full load does.

The partial load is forced (conftest.loaded_with_budget). Modules past the budget keep their weights where they are
and are cast per forward (comfy_cast_weights), with LoRA patches applied on the fly (LowVramPatch).
"""

import contextlib

import pytest
import torch

from unipic_core.models.lora import add_lora

from conftest import loaded_with_budget, offloaded_modules, randomise_lora_b


def edit_inputs(patcher, batch=2):
    dit = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 16, 8, 12, generator=g)
    context = torch.randn(batch, 7, dit.context_embedder.in_features, generator=g)
    pooled = torch.randn(batch, dit.y_embedder.mlp[0].in_features, generator=g)
    reference = torch.randn(batch, 16, 8, 12, generator=g)
    return x, torch.tensor([800.0, 300.0][:batch]), context, pooled, reference


def forward(patcher, x, timestep, context, pooled, reference):
    with torch.no_grad():
        return patcher.model.diffusion_model(x, timestep, context=context, y=pooled, unipic2_ref=reference)


def test_a_partially_loaded_edit_model_with_lora_patches_computes_what_a_full_load_does(host, native_model,
                                                                                       fresh_dit):
    """LoRA patches on offloaded weights are applied per forward (LowVramPatch): the same output as merged ones.
    (test_native_kontext checks the partial load without a LoRA.)"""
    from unipic_core.models.lora import adapter_tensors, lora_weights

    plain = host.module("nodes.host.native_kontext").with_kontext_reference(native_model)
    add_lora(fresh_dit, 4, 8, seed=0)
    randomise_lora_b(fresh_dit, 0.3)
    patcher = host.node("UniPic2ApplyLoRA").apply(plain, lora_weights(adapter_tensors(fresh_dit), 4, 8, {}), 0.8)[0]
    args = edit_inputs(patcher)
    with loaded_with_budget(patcher, None):
        full = forward(patcher, *args)
        assert offloaded_modules(patcher) == 0
    with loaded_with_budget(patcher, 0.3):
        partial = forward(patcher, *args)
        assert offloaded_modules(patcher) > 0
        assert patcher.model.model_loaded_weight_memory < 0.5 * patcher.model_size()
    assert (partial - full).abs().max() <= 1e-6
    with loaded_with_budget(plain, None):
        assert (full - forward(plain, *args)).abs().max() > 1e-4  # the LoRA really is in both loads


def test_training_gradients_under_a_partial_load_equal_a_full_load(host, native_model):
    dit = host.module("nodes.host.native_training").NativeDiT(native_model)
    add_lora(dit, 4, 8, seed=0)
    randomise_lora_b(dit, 0.3)
    args = edit_inputs(dit.patcher)
    grads = []
    for fraction in (None, 0.3):
        with loaded_with_budget(dit.patcher, fraction), torch.inference_mode(False), torch.enable_grad():
            host.module("nodes.host.memory").make_trainable(dit.patcher.model.diffusion_model)
            assert (offloaded_modules(dit.patcher) > 0) == (fraction is not None)
            (dit(*args).float() ** 2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in dit.adapter_parameters().items()})
        for p in dit.adapter_parameters().values():
            p.grad = None
    assert all((grads[0][k] - grads[1][k]).abs().max() <= 1e-6 for k in grads[0])
    assert any(g.abs().max() > 0 for g in grads[0].values())


@pytest.mark.parametrize("kind", ["native", "diffusers"])
def test_gradient_checkpointing_recomputes_the_blocks_and_gives_the_same_gradients(host, native_model, fresh_dit,
                                                                                   kind):
    """The trainer's update runs under dit.checkpointing() by default: each block runs again in the backward pass
    (that is what saves the activation memory) and the adapter's gradients are unchanged."""
    if kind == "native":
        dit = host.module("nodes.host.native_training").NativeDiT(native_model)
        add_lora(dit, 4, 8, seed=0)
        dit.on_device()
        block = dit.patcher.model.diffusion_model.joint_blocks[0].x_block.attn.qkv
        x, timestep, context, pooled, reference = edit_inputs(dit.patcher)
    else:
        dit = fresh_dit
        add_lora(dit, 4, 8, seed=0)
        block = dit.transformer.transformer_blocks[0].attn.to_q
        config = dit.transformer.config
        g = torch.Generator().manual_seed(5)
        x, reference = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
        context = torch.randn(2, 7, config.joint_attention_dim, generator=g)
        pooled, timestep = torch.randn(2, config.pooled_projection_dim, generator=g), torch.tensor([800.0, 300.0])
    randomise_lora_b(dit, 0.3)
    calls = []
    block.register_forward_hook(lambda *args: calls.append(1))
    grads = []
    for checkpointing in (False, True):
        calls.clear()
        with torch.inference_mode(False), torch.enable_grad(), (dit.checkpointing() if checkpointing
                                                                else contextlib.nullcontext()):
            (dit(x, timestep, context, pooled, reference).float() ** 2).mean().backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({k: p.grad.clone() for k, p in dit.adapter_parameters().items()})
        for p in dit.adapter_parameters().values():
            p.grad = None
    assert all((grads[0][k] - grads[1][k]).abs().max() <= 1e-6 for k in grads[0])
