"""The GRPO loop on a native ComfyUI MODEL (nodes/host/native_training.py) equals the loop on the diffusers DiT."""

import dataclasses

import pytest
import torch

from unipic_core.models.loading import load_kontext
from unipic_core.models.lora import adapter_tensors, add_lora, set_adapter_tensors
from unipic_core.rewards import colour_reward
from unipic_core.training.grpo_settings import GRPOSettings
from unipic_core.training.grpo_trainer import GRPOTrainer
from unipic_core.training.training_data import TrainingItem
from unipic_core.training.training_models import models_on_device

from conftest import load_lora_in_diffusers, randomise_lora_b


@pytest.fixture
def native_training(host):
    """The pack's nodes/host/native_training module as the host imported it."""
    return host.module("nodes.host.native_training")


@pytest.fixture
def both(native_training, native_model, fresh_dit):
    """(native DiT, diffusers DiT) on the same weights, each with the same trained-looking adapter."""
    native = native_training.NativeDiT(native_model).on_device()
    add_lora(native, 4, 12, seed=0)
    add_lora(fresh_dit, 4, 12, seed=0)
    randomise_lora_b(fresh_dit, 0.2)
    set_adapter_tensors(native, adapter_tensors(fresh_dit))
    return native.on_device(), fresh_dit


def inputs(dit_config, batch=2, reference=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 8, 12, generator=g)
    tokens = torch.randn(batch, 7, dit_config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, dit_config.pooled_projection_dim, generator=g)
    ref = torch.randn(batch, 16, 8, 12, generator=g) if reference else None
    return x, torch.tensor([700.0, 250.0][:batch]), tokens, pooled, ref


def test_native_adapter_has_the_diffusers_adapters_keys_shapes_and_start(native_training, native_model, fresh_dit):
    native = native_training.NativeDiT(native_model)
    assert add_lora(native, 4, 8, seed=3) and add_lora(fresh_dit, 4, 8, seed=3)
    ours, theirs = adapter_tensors(native), adapter_tensors(fresh_dit)
    assert sorted(ours) == sorted(theirs) and len(ours) > 16  # attn, attn2 (dual attention) and context stream
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("reference", [True, False], ids=["edit", "text-to-image"])
def test_native_forward_with_the_adapter_equals_the_diffusers_one(both, reference):
    native, diffusers = both
    args = inputs(diffusers.transformer.config, reference=reference)
    with torch.no_grad():
        assert (native(*args) - diffusers(*args)).abs().max() <= 1e-5
        with native.adapter_disabled(), diffusers.adapter_disabled():
            off_native, off_diffusers = native(*args), diffusers(*args)
        assert (off_native - off_diffusers).abs().max() <= 1e-5
        assert (native(*args) - off_native).abs().mean() > 1e-3  # the adapter really acts


def test_native_adapter_gradients_equal_the_diffusers_ones(both):
    native, diffusers = both
    args = inputs(diffusers.transformer.config)
    grads = []
    for dit in (native, diffusers):
        with torch.inference_mode(False), torch.enable_grad():
            (dit(*args).float() ** 2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in dit.adapter_parameters().items()})
    assert sorted(grads[0]) == sorted(grads[1])
    for key, grad in grads[0].items():
        assert (grad - grads[1][key]).abs().max() <= 1e-5 * max(1.0, grads[1][key].abs().max().item()), key
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_two_grpo_steps_on_the_native_model_equal_the_diffusers_loop(native_training, native_model,
                                                                     tiny_kontext_dir):
    """The same settings, data, noise and reward: the adapters after two steps (four AdamW updates) agree."""
    settings = GRPOSettings(steps=2, group_size=3, sampling_steps=3, resolution=64, lora_rank=4, lora_alpha=12,
                            learning_rate=1e-2, save_every=0)
    data = [TrainingItem("a red fox")]
    reference = models_on_device(load_kontext(tiny_kontext_dir), tiny_kontext_dir, torch.device("cpu"))
    native = native_training.NativeDiT(native_model)
    with torch.inference_mode(False), torch.enable_grad():
        results = []
        for models in (reference, dataclasses.replace(reference, dit=native.on_device)):
            trainer = GRPOTrainer(models, colour_reward((1, 1, 1)), data, settings)
            try:
                trainer.run()
                results.append((adapter_tensors(trainer.dit), trainer.history))
            finally:
                trainer.close()
    (ours, our_history), (theirs, their_history) = results[1], results[0]
    # W + B @ A (native) and x A^T B^T (peft) round differently in fp32; Adam's normalised steps carry that to
    # ~2.5e-5 (measured) on values of order 0.1 after four updates of lr 1e-2.
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-4
    assert any(theirs[k].abs().max() > 0 for k in theirs if "lora_B" in k)  # it trained
    for mine, other in zip(our_history, their_history):
        assert mine["rewards"]["total"][0] == pytest.approx(other["rewards"]["total"][0], abs=1e-5)


def test_training_leaves_the_users_model_untouched(native_training, native_model, fresh_dit):
    import comfy.model_management

    native = native_training.NativeDiT(native_model).on_device()
    args = inputs(fresh_dit.transformer.config, reference=False)

    def plain():
        comfy.model_management.load_models_gpu([native_model])
        with torch.no_grad():
            return native_model.model.diffusion_model(*args[:2], context=args[2], y=args[3])

    before = plain()
    add_lora(native, 4, 12, seed=0)
    randomise_lora_b(native, 0.5)
    native.on_device()
    with torch.no_grad():
        assert (native(*args) - before).abs().mean() > 1e-3
    native.remove_lora()
    assert torch.equal(plain(), before)


def test_native_lora_loader_gives_what_diffusers_load_lora_weights_gives(host, native_model, fresh_dit,
                                                                         tiny_kontext):
    """A trainer-written file through native LoraLoaderModelOnly (strength 1) and through diffusers."""
    import comfy.model_management

    from unipic_core.models.lora import lora_weights, save_lora

    add_lora(fresh_dit, 4, 12, seed=0)
    randomise_lora_b(fresh_dit, 0.2)
    path = save_lora(lora_weights(adapter_tensors(fresh_dit), 4, 12, {}),
                     host.loras / "unipic2" / "native_vs_diffusers.safetensors")
    fresh_dit.remove_lora()
    load_lora_in_diffusers(fresh_dit.transformer, tiny_kontext, path)
    x, timestep, tokens, pooled, _ = inputs(fresh_dit.transformer.config, reference=False)
    patched = host.node("LoraLoaderModelOnly").load_lora_model_only(
        native_model, "unipic2/native_vs_diffusers.safetensors", 1.0)[0]
    comfy.model_management.load_models_gpu([patched])
    with torch.no_grad():
        ours = patched.model.diffusion_model(x, timestep, context=tokens, y=pooled)
        theirs = fresh_dit(x, timestep, tokens, pooled, None)
        comfy.model_management.load_models_gpu([native_model])
        base = native_model.model.diffusion_model(x, timestep, context=tokens, y=pooled)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - base).abs().mean() > 1e-3  # the LoRA really acts
