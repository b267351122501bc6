"""GRPO training, reward and LoRA nodes inside the real ComfyUI host (in-process)."""

import pytest
import torch

from conftest import native_tiny_dit
from test_nodes_in_host import TINY


def trainer_inputs(**overrides):
    values = dict(lora_name="node_test", steps=2, group_size=2, prompts_per_step=1, sampling_steps=2,
                  noise_level=0.7, guidance=3.5, beta=0.04, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0,
                  clip_range=1e-4, timestep_fraction=0.99, advantage_std="group", resolution=64, micro_batch=0, updates_per_step=2,
                  seed=0, save_every=1, resume=False, negative_prompt="", algorithm="flow-grpo", sde_window=3,
                  nft_beta=1.0, nft_kl=1e-4, gradient_checkpointing=True)
    return {**values, **overrides}


def untouched(model) -> bool:
    """The loader's MODEL carries no weight patch and no weight wrapper: training worked on a clone."""
    return not model.patches and not model.weight_wrapper_patches


@pytest.fixture(scope="module")
def kontext(host):
    return host.node("LoadUniPic2Kontext").load(TINY, "fp32")


@pytest.fixture(scope="module")
def trained(host, kontext):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox\na blue lake")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with torch.inference_mode():  # as ComfyUI runs nodes
        return host.node("UniPic2GRPOTrainer").train(model, vae, prompts, reward, text_encoders=text,
                                                     **trainer_inputs())


def test_trainer_node_trains_writes_and_restores_the_model(host, kontext, trained):
    model = kontext[0]
    lora, curves, samples, summary = trained
    assert lora.info["steps"] == 2 and lora.info["base_model"] == TINY
    assert (host.loras / "unipic2" / "node_test.safetensors").exists()
    assert (host.loras / "unipic2" / "node_test.training-state").exists()
    assert curves.shape == (1, 512, 768, 3) and curves.std() > 0
    assert samples.shape == (1, 64, 128, 3)  # a grid of the G = 2 latest samples
    assert "2 steps" in summary
    assert untouched(model)


@pytest.mark.parametrize("algorithm", ["flow-grpo-fast", "diffusion-nft"])
def test_the_trainer_node_runs_each_algorithm_on_the_native_model(host, kontext, algorithm):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with torch.inference_mode():
        lora = host.node("UniPic2GRPOTrainer").train(
            model, vae, prompts, reward, text_encoders=text,
            **trainer_inputs(lora_name=f"node_{algorithm}", steps=1, sampling_steps=4, sde_window=2,
                             algorithm=algorithm))[0]
    assert lora.info["settings"]["algorithm"] == algorithm
    assert any(v.abs().max() > 0 for k, v in lora.tensors.items() if "lora_B" in k)  # it learned something
    assert untouched(model)


def test_apply_lora_at_strength_zero_is_the_base_model_exactly(host, kontext, trained):
    model, text, _ = kontext
    conditioning = host.node("UniPic2TextEncode").encode(text, "a red fox", "")
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    args = dict(seed=3, steps=3, guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)
    sampler = host.node("UniPic2Sampler")
    lora = host.node("UniPic2LoadLoRA").load("unipic2/node_test.safetensors")[0]
    zero = host.node("UniPic2ApplyLoRA").apply(model, lora, 0.0)[0]
    one = host.node("UniPic2ApplyLoRA").apply(model, lora, 1.0)[0]
    base = sampler.sample(model, *conditioning, latent, **args)[0]["samples"]
    assert torch.equal(sampler.sample(zero, *conditioning, latent, **args)[0]["samples"], base)
    assert not torch.equal(sampler.sample(one, *conditioning, latent, **args)[0]["samples"], base)
    assert torch.equal(sampler.sample(model, *conditioning, latent, **args)[0]["samples"], base)  # removed again


def test_apply_lora_patches_weights_at_the_trained_scale(host, kontext, trained):
    import comfy.model_management as mm
    import comfy.utils

    model = kontext[0]
    lora = trained[0]
    module = "transformer_blocks.1.attn.to_k"  # rows 128..255 of the MMDiT's fused qkv weight
    target = host.module("nodes.host.native_training").lora_targets(model)[module]
    down, up = lora.pair(module)

    def weight(patcher):
        mm.load_models_gpu([patcher])
        rows = comfy.utils.get_attr(patcher.model, target.key)[target.start:target.start + target.shape[0]]
        return rows.detach().clone()

    base = weight(model)
    patched = weight(host.node("UniPic2ApplyLoRA").apply(model, lora, 0.5)[0])
    assert torch.allclose(patched, base + 0.5 * up @ down, atol=1e-6)
    assert not torch.equal(patched, base)
    assert torch.equal(weight(model), base)  # removable: unpatched again


def test_save_lora_never_overwrites(host, trained):
    node = host.node("UniPic2SaveLoRA")
    first = node.save(trained[0], "unipic2/saved")["ui"]["text"][0]
    second = node.save(trained[0], "unipic2/saved")["ui"]["text"][0]
    assert first.endswith("saved_00001.safetensors") and second.endswith("saved_00002.safetensors")
    with pytest.raises(ValueError, match="leaves models/loras"):
        node.save(trained[0], "../../escape")


def test_trainer_node_refuses_bad_inputs(host, kontext):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2JPEGReward").make("compressibility")[0]
    trainer = host.node("UniPic2GRPOTrainer")
    with pytest.raises(ValueError, match="exactly one of 'text_encoders'"):
        trainer.train(model, vae, prompts, reward, **trainer_inputs())
    with pytest.raises(ValueError, match="group_size is 1"):
        trainer.train(model, vae, prompts, reward, text_encoders=text, **trainer_inputs(group_size=1))
    with pytest.raises(ValueError, match="prompt list is empty"):
        host.node("UniPic2PromptList").make("\n\n")
    with pytest.raises(ValueError, match="2 image.*1 instruction"):
        host.node("UniPic2EditPairs").make("one", images=torch.rand(2, 64, 64, 3))
    assert untouched(model)


def test_combined_reward_reports_each_term(host):
    bright = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    jpeg = host.node("UniPic2JPEGReward").make("incompressibility")[0]
    combined = host.node("UniPic2CombineRewards").combine(bright, 2.0, jpeg, 0.5)[0]
    images = torch.rand(3, 64, 64, 3)
    scores = combined.score(images, ["x"] * 3, None)
    assert set(scores) == {"brightness", "jpeg_incompressibility"}
    assert torch.allclose(combined.total(scores), 2.0 * scores["brightness"] + 0.5 * scores["jpeg_incompressibility"])


def test_chained_combiners_sum_any_number_of_rewards(host):
    combine = host.node("UniPic2CombineRewards").combine
    colours = [host.node("UniPic2ColourReward").make(*rgb)[0] for rgb in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    jpegs = [host.node("UniPic2JPEGReward").make(mode)[0] for mode in ("compressibility", "incompressibility")]
    first = combine(colours[0], 1.0, colours[1], 2.0, colours[2], 3.0)[0]
    chained = combine(first, 0.5, jpegs[0], 4.0, jpegs[1], 5.0)[0]
    assert [t.weight for t in chained.terms] == [0.5, 1.0, 1.5, 4.0, 5.0]
    assert len(set(chained.names)) == 5  # the three colour terms share a name and are told apart
    images = torch.rand(2, 64, 64, 3)
    scores = chained.score(images, ["x"] * 2, None)
    expected = sum(t.weight * scores[t.name] for t in chained.terms)
    assert torch.allclose(chained.total(scores), expected)
    assert not torch.allclose(scores[chained.names[0]], scores[chained.names[1]])  # different targets


def test_lora_file_loads_through_the_hosts_own_sd3_key_map(host, fresh_dit, tmp_path):
    """The file as a native ComfyUI LoraLoader reads it on an SD3 model: the host's diffusers->MMDiT key map
    (fused qkv slices) and its load_lora / calculate_weight, at strength 0.7."""
    import comfy.lora
    import comfy.utils

    from unipic_core.models.lora import adapter_tensors, add_lora, load_lora, lora_weights, save_lora

    from conftest import randomise_lora_b

    # ComfyUI's SD3 map assumes SD3's 64-wide heads, one per block: the tiny DiT (2 blocks, width 128) has them.
    dit = fresh_dit
    assert dit.transformer.config.num_layers == 2 and dit.transformer.config.attention_head_dim == 64
    add_lora(dit, 4, 8, seed=0)
    randomise_lora_b(dit)
    lora = load_lora(save_lora(lora_weights(adapter_tensors(dit), 4, 8, {}), tmp_path / "sd3.safetensors"))

    diffusers_keys = comfy.utils.mmdit_to_diffusers({"depth": 2}, output_prefix="diffusion_model.")
    key_map = {f"transformer.{k[:-len('.weight')]}": v for k, v in diffusers_keys.items() if k.endswith(".weight")}
    patches = comfy.lora.load_lora(lora.tensors, key_map)
    assert len(patches) == len(lora.modules())  # every module found its place in the MMDiT

    def patched(target: str, shape) -> torch.Tensor:
        weight = torch.zeros(shape)
        for key, patch in patches.items():
            name, offset = (key[0], key[1]) if isinstance(key, tuple) else (key, None)
            if name == target:
                weight = comfy.lora.calculate_weight([(0.7, patch, 1.0, offset, None)], weight, name)
        return weight

    qkv = patched("diffusion_model.joint_blocks.1.x_block.attn.qkv.weight", (384, 128))
    for i, projection in enumerate(("to_q", "to_k", "to_v")):
        down, up = lora.pair(f"transformer_blocks.1.attn.{projection}")
        assert torch.allclose(qkv[i * 128:(i + 1) * 128], 0.7 * up @ down, atol=1e-6)
    out = patched("diffusion_model.joint_blocks.0.context_block.attn.proj.weight", (128, 128))
    down, up = lora.pair("transformer_blocks.0.attn.to_add_out")
    assert torch.allclose(out, 0.7 * up @ down, atol=1e-6)


def test_cancel_from_the_progress_hook_keeps_the_step_it_ended(host, kontext):
    import comfy.model_management as mm
    import comfy.utils

    from unipic_core.models.lora import load_lora

    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]

    def cancel_at_step_two(value, total, preview, **_):  # what a server's hook does once Cancel is pressed
        if value == 2:
            raise mm.InterruptProcessingException()

    comfy.utils.set_progress_bar_global_hook(cancel_at_step_two)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            host.node("UniPic2GRPOTrainer").train(model, vae, prompts, reward, text_encoders=text,
                                                  **trainer_inputs(lora_name="cancelled", steps=5, save_every=0))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert load_lora(host.loras / "unipic2" / "cancelled.safetensors").info["steps"] == 2
    assert untouched(model)


def test_trainer_refuses_a_model_with_applied_loras(host, kontext, trained):
    model, text, vae = kontext
    patched = host.node("UniPic2ApplyLoRA").apply(model, trained[0], 1.0)[0]
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with pytest.raises(ValueError, match="connect that LoRA to the trainer's 'lora' input"):
        host.node("UniPic2GRPOTrainer").train(patched, vae, prompts, reward, text_encoders=text, **trainer_inputs())


def test_trainer_node_refuses_to_overwrite_an_unresumed_lora(host, kontext, trained):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox\na blue lake")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    path = host.loras / "unipic2" / "node_test.safetensors"
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"^UniPic2 GRPO Trainer: .*node_test\.safetensors already exists and "
                                         r"'resume' is off.*turn 'resume' on to continue it, or choose another "
                                         r"lora_name"):
        host.node("UniPic2GRPOTrainer").train(model, vae, prompts, reward, text_encoders=text, **trainer_inputs())
    assert path.read_bytes() == before


def test_requeued_trainer_node_returns_the_finished_run(host, kontext, trained):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox\na blue lake")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with torch.inference_mode():
        lora, curves, samples, summary = host.node("UniPic2GRPOTrainer").train(
            model, vae, prompts, reward, text_encoders=text, **trainer_inputs(resume=True))
    assert all(torch.equal(lora.tensors[k], v) for k, v in trained[0].tensors.items())
    assert torch.equal(curves, trained[1])
    assert samples.shape == trained[2].shape and torch.allclose(samples, trained[2], atol=0.5 / 255 + 1e-6)
    assert "2 steps" in summary


@pytest.mark.parametrize("lora_name", ["x" * 101, "bad:name", ".hidden", "a/b", "../escape", "  "])
def test_bad_lora_name_is_refused_before_step_one(host, kontext, lora_name):
    model, text, vae = kontext
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    from unipic_core.rewards import Reward, RewardTerm

    calls = []
    reward = Reward([RewardTerm("counted", 1.0, lambda images, *_: calls.append(1) or images.mean(dim=(1, 2, 3)))])
    before = sorted(host.loras.rglob("*"))
    with pytest.raises(ValueError, match=r"^UniPic2 GRPO Trainer: lora_name '.*' (is \d+ characters long|contains|"
                                         r"starts with '\.'|is empty)[^;]*; use up to 100 letters, digits, spaces"):
        host.node("UniPic2GRPOTrainer").train(model, vae, prompts, reward, text_encoders=text,
                                              **trainer_inputs(lora_name=lora_name, steps=1))
    assert calls == [] and sorted(host.loras.rglob("*")) == before


def test_trainer_refuses_an_fp8_fast_model_naming_the_fix(host, kontext, tiny_kontext_dir):
    _, text, vae = kontext
    fast = native_tiny_dit(tiny_kontext_dir, dtype=torch.float8_e4m3fn, fp8_optimizations=True)
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with pytest.raises(ValueError, match="fp8_e4m3fn_fast.*load it with fp8_e4m3fn"):
        host.node("UniPic2GRPOTrainer").train(fast, vae, prompts, reward, text_encoders=text,
                                              **trainer_inputs(lora_name="fp8_fast"))


def test_trainer_trains_an_fp8_model(host, kontext, tiny_kontext_dir):
    """fp8_e4m3fn storage: weights are cast to the compute dtype before the LoRA delta is added."""
    _, text, vae = kontext
    fp8 = native_tiny_dit(tiny_kontext_dir, dtype=torch.float8_e4m3fn)
    prompts = host.node("UniPic2PromptList").make("a red fox")[0]
    reward = host.node("UniPic2ColourReward").make(1.0, 1.0, 1.0)[0]
    with torch.inference_mode():
        lora = host.node("UniPic2GRPOTrainer").train(fp8, vae, prompts, reward, text_encoders=text,
                                                     **trainer_inputs(lora_name="fp8", steps=1))[0]
    assert lora.info["steps"] == 1
    assert any(v.abs().max() > 0 for k, v in lora.tensors.items() if "lora_B" in k)  # it trained
    assert untouched(fp8)
