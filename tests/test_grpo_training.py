"""The GRPO training loop on the tiny model: learning, exact resume, edit pairs, and bad input."""

import dataclasses
import logging
import math

import pytest
import torch

from unipic_core.atomic_files import WriteError
from unipic_core.models.loading import load_kontext
from unipic_core.models.lora import LoRAError, load_lora, save_lora
from unipic_core.rewards import Reward, RewardTerm, colour_reward, combine, edit_consistency_reward
from unipic_core.training.grpo_settings import GRPOSettings
from unipic_core.training.grpo_trainer import GRPOTrainer, Hooks
from unipic_core.training.training_data import TrainingItem, check_reward_inputs, edit_pairs, read_prompts
from unipic_core.training.training_models import models_on_device
from unipic_core.training.training_state import load_state

from conftest import native_tiny_dit

PROMPTS = [TrainingItem("a red fox"), TrainingItem("a blue lake")]


def small(**overrides) -> GRPOSettings:
    values = dict(steps=2, group_size=4, sampling_steps=3, resolution=64, lora_rank=4, lora_alpha=12,
                  learning_rate=1e-2, save_every=0)
    return GRPOSettings(**{**values, **overrides})


@pytest.fixture(params=["diffusers"])
def models(request, tiny_kontext_dir):
    """Freshly loaded tiny components (training puts an adapter into the DiT). Parametrized with "native", the DiT
    is the one the trainer node trains: ComfyUI's native MODEL (Load Diffusion Model) with weight-wrapper LoRAs."""
    models = models_on_device(load_kontext(tiny_kontext_dir), tiny_kontext_dir, torch.device("cpu"))
    if request.param == "native":
        host = request.getfixturevalue("host")  # puts ComfyUI on sys.path
        native = host.module("nodes.host.native_training").NativeDiT(native_tiny_dit(tiny_kontext_dir))
        models = dataclasses.replace(models, dit=native.on_device)
    return models


BOTH_DITS = pytest.mark.parametrize("models", ["diffusers", "native"], indirect=True)


def train(models, settings, data=PROMPTS, reward=None, **kwargs):
    trainer = GRPOTrainer(models, reward or colour_reward((1, 1, 1)), data, settings, **kwargs)
    try:
        return trainer, trainer.run()
    finally:
        trainer.close()


@BOTH_DITS
def test_resume_equals_training_straight_through(models, tmp_path):
    # alpha / r = 3 is not a power of two: the checkpoint must hold the raw adapter for this to be exact.
    _, straight = train(models, small(steps=4), checkpoint=tmp_path / "a.safetensors")
    _, first_half = train(models, small(steps=2), checkpoint=tmp_path / "b.safetensors")
    trainer, resumed = train(models, small(steps=4), checkpoint=tmp_path / "b.safetensors", resume=True)
    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[:2] == first_half.history
    for key, value in straight.lora.tensors.items():
        assert torch.equal(resumed.lora.tensors[key], value), key
    assert any(v.abs().max() > 0 for k, v in straight.lora.tensors.items() if "lora_B" in k)
    saved = load_lora(tmp_path / "b.safetensors")
    assert saved.info["steps"] == 4 and saved.info["rewards"] == ["brightness"]


def test_checkpoints_every_n_steps_and_on_cancel(models, tmp_path):
    path = tmp_path / "c.safetensors"
    steps_seen = []
    trainer = GRPOTrainer(models, colour_reward((1, 1, 1)), PROMPTS, small(steps=10, save_every=2), checkpoint=path)
    try:
        result = trainer.run(Hooks(on_step=lambda r: steps_seen.append(r.step),
                                   cancel_requested=lambda: len(steps_seen) == 3))
    finally:
        trainer.close()
    assert result.cancelled and steps_seen == [1, 2, 3]
    assert load_lora(path).info["steps"] == 3  # the step that was running when Cancel came is kept


def test_edit_pairs_train_with_reference_latents(models):
    sources = [torch.rand(64, 96, 3), torch.rand(96, 64, 3)]
    data = edit_pairs(sources, ["make it snow", "add a boat"])
    trainer, result = train(models, small(steps=1, resolution=96, prompts_per_step=2), data,
                            edit_consistency_reward("l1"))
    assert tuple(result.samples.shape[1:]) in [(64, 96, 3), (96, 64, 3)]  # each source keeps its aspect
    reward = result.history[0]["rewards"]["edit_consistency_l1"][0]
    assert 0 < reward <= 1


def test_nan_reward_group_is_skipped_and_reported(models):
    calls = []

    def half_nan(images, prompts, sources):
        calls.append(prompts[0])
        scores = images.mean(dim=(1, 2, 3))
        return scores * math.nan if prompts[0] == "a red fox" else scores

    reward = Reward([RewardTerm("flaky", 1.0, half_nan)])
    _, result = train(models, small(steps=1, prompts_per_step=2), reward=reward)
    step = result.history[0]
    assert step["skipped_groups"] == 1
    assert math.isfinite(step["rewards"]["flaky"][0]) and math.isfinite(step["loss"])


def test_bad_settings_and_data_are_refused_with_clear_errors(models, tmp_path):
    with pytest.raises(ValueError, match="group_size is 1"):
        small(group_size=1).check()
    with pytest.raises(ValueError, match="noise_level"):
        small(noise_level=0.0).check()
    with pytest.raises(ValueError, match="prompt list is empty"):
        read_prompts("\n  \n# only a comment\n")
    with pytest.raises(ValueError, match="2 image.*1 instruction"):
        edit_pairs([torch.rand(64, 64, 3)] * 2, ["one"])
    with pytest.raises(ValueError, match="prompt list is empty"):
        GRPOTrainer(models, colour_reward((1, 1, 1)), [], small())
    with pytest.raises(ValueError, match="compares with the source image"):
        train(models, small(steps=1), reward=edit_consistency_reward())


def test_a_reward_that_cannot_score_some_item_is_refused_before_training():
    """Prompts are drawn at random per step, so an unfit item anywhere in the list is refused when the trainer is
    created (models=None: nothing is touched), naming the item and the reward, not many steps in."""
    counting = ('{"tag": "counting", "include": [{"class": "clock", "count": 2}], "prompt": "a photo of two clocks"}')
    objects = Reward([RewardTerm("objects", 1.0, lambda images, prompts, sources, metadata: torch.ones(len(images)),
                                 needs_metadata=True)])
    geneval_then_plain = read_prompts(counting + "\n" + counting.replace("two clocks", "2 clocks") + "\na red fox")
    with pytest.raises(ValueError, match="'objects' reward checks the objects a prompt asks for, but 'a red fox' is a "
                                         "plain prompt; write GenEval-style lines in UniPic2 Prompt List"):
        GRPOTrainer(None, objects, geneval_then_plain, small())
    pairs = edit_pairs([torch.rand(64, 64, 3)], ["make it blue"])
    with pytest.raises(ValueError, match="'objects' reward .* this run trains edit pairs \\('make it blue'\\)"):
        GRPOTrainer(None, objects, pairs, small())
    with pytest.raises(ValueError, match="'edit_consistency_l1' reward compares with the source image, but 'a blue "
                                         "lake' is a text-to-image prompt; train on edit pairs"):
        GRPOTrainer(None, edit_consistency_reward(), [TrainingItem("a blue lake")], small())
    with pytest.raises(ValueError, match="'edit_consistency_l1' reward compares .* 'a red fox'"):  # a combined term
        check_reward_inputs(combine([(colour_reward((1, 1, 1)), 1.0), (edit_consistency_reward(), 1.0)]), PROMPTS)
    assert check_reward_inputs(objects, geneval_then_plain[:2]) is None
    assert check_reward_inputs(combine([(objects, 1.0), (colour_reward((1, 1, 1)), 1.0)]), geneval_then_plain[:2]) is None
    assert check_reward_inputs(edit_consistency_reward(), pairs) is None


def test_resume_refuses_another_rank_or_base_model(models, tmp_path):
    path = tmp_path / "r.safetensors"
    train(models, small(steps=1), checkpoint=path)
    with pytest.raises(LoRAError, match="lora_rank = 4.*asks for 8"):
        train(models, small(steps=2, lora_rank=8), checkpoint=path, resume=True)
    models.base_model = "another-model"
    with pytest.raises(LoRAError, match="trained on base model 'UniPic2-tiny-Kontext', not 'another-model'"):
        train(models, small(steps=2), checkpoint=path, resume=True)


def test_failed_checkpoint_write_keeps_the_previous_one(models, tmp_path, monkeypatch):
    path = tmp_path / "d.safetensors"
    train(models, small(steps=1), checkpoint=path)
    state, lora = path.with_suffix(".training-state").read_bytes(), path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unipic_core.training.training_state.torch.save", disk_full)
    with pytest.raises(WriteError, match="No space left"):
        train(models, small(steps=2), checkpoint=path, resume=True)
    assert path.with_suffix(".training-state").read_bytes() == state and path.read_bytes() == lora


def assert_brightness_rises(models, **overrides) -> None:
    """The learning test. The tiny random VAE decodes any latent to a brightness within about 0.448..0.455, too flat
    for any policy to move, so here pixels are a fixed map of the latent (sigmoid of its first three channels);
    the DiT, LoRA, sampling, reward, advantages, loss and AdamW are the real ones. Margin: 0.025, about 8 standard
    errors of a 3-step mean at the start (~0.003 with G = 8 images a step), so the rise cannot come from sampling
    noise."""
    models.decode = lambda latents: torch.sigmoid(latents[:, :3].float()).movedim(1, -1)
    # One update per step: with this test's large learning rate, a second update would be mostly clipped away.
    settings = small(steps=25, group_size=8, sampling_steps=4, lora_rank=8, lora_alpha=16, learning_rate=3e-2,
                     beta=0.0, updates_per_step=1, **overrides)
    _, result = train(models, settings)
    means = [h["rewards"]["brightness"][0] for h in result.history]
    stds = [h["rewards"]["brightness"][1] for h in result.history]
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    standard_error = (sum(stds[:3]) / 3) / math.sqrt(3 * settings.group_size)
    assert last - first > max(5 * standard_error, 0.025), (means, standard_error)


@BOTH_DITS
def test_brightness_reward_rises_within_twenty_five_steps(models):
    """Flow-GRPO. Measured with seeds 0, 1, 2: rises of 0.25, 0.24, 0.21 in 16-18 s each (diffusers and native DiT
    within 0.003 of each other)."""
    assert_brightness_rises(models)


def test_flow_grpo_fast_raises_the_brightness_reward_as_flow_grpo_does(models):
    """The fast variant (CPS steps on a 2-step window of 4, only the window trained). Measured with seeds 0, 1, 2:
    rises of 0.25, 0.24, 0.27 in 13 s each, against flow-grpo's 16-18 s (benchmarks/grpo.py compares the costs)."""
    assert_brightness_rises(models, algorithm="flow-grpo-fast", sde_window=2, noise_level=0.8)


def test_diffusion_nft_raises_the_brightness_reward(models):
    """DiffusionNFT (DPM-Solver++(2M) samples of the old policy, no CFG, 3 training points per image). Measured
    with seeds 0, 1, 2: rises of 0.16, 0.19, 0.20 in 10 s each; it climbs fastest in the first steps, which the
    3-step means at both ends under-count."""
    assert_brightness_rises(models, algorithm="diffusion-nft", nft_kl=0.0)


def test_flow_grpo_fast_resumes_exactly_and_trains_only_its_window(models, tmp_path, monkeypatch):
    from unipic_core.training import grpo_trainer
    from unipic_core.training.grpo import sde_window
    from unipic_core.training.training_plan import step_generator

    trained = {}
    terms = grpo_trainer.flow_grpo_terms

    def recording_terms(dit, settings, inputs, steps, *piece):
        trained.setdefault(inputs.step, steps)
        return terms(dit, settings, inputs, steps, *piece)

    monkeypatch.setattr(grpo_trainer, "flow_grpo_terms", recording_terms)
    fast = dict(algorithm="flow-grpo-fast", sde_window=2, sampling_steps=6)
    _, straight = train(models, small(steps=3, **fast), checkpoint=tmp_path / "a.safetensors")
    assert trained == {step: sde_window(6, 2, step_generator(0, step, -2)) for step in range(3)}
    train(models, small(steps=1, **fast), checkpoint=tmp_path / "b.safetensors")
    _, resumed = train(models, small(steps=3, **fast), checkpoint=tmp_path / "b.safetensors", resume=True)
    assert all(torch.equal(straight.lora.tensors[k], resumed.lora.tensors[k]) for k in straight.lora.tensors)
    with pytest.raises(LoRAError, match=r"algorithm = 'flow-grpo-fast'.*'flow-grpo'"):
        train(models, small(steps=4, sampling_steps=6), checkpoint=tmp_path / "b.safetensors", resume=True)
    with pytest.raises(ValueError, match=r"sde_window is 4; .* use 1 to 3"):  # past the first half of 6 steps
        small(steps=4, **dict(fast, sde_window=4)).check()


def test_a_state_from_before_a_setting_existed_resumes_only_at_its_default(models, tmp_path):
    """A checkpoint written before `algorithm` existed ran flow-grpo: it resumes as such, not as another one."""
    path = tmp_path / "old.safetensors"
    train(models, small(steps=1), checkpoint=path)
    state = torch.load(path.with_suffix(".training-state"), weights_only=True)
    del state["settings"]["algorithm"], state["settings"]["sde_window"]
    torch.save(state, path.with_suffix(".training-state"))
    with pytest.raises(LoRAError, match=r"algorithm = 'flow-grpo'.*'flow-grpo-fast'"):
        train(models, small(steps=2, algorithm="flow-grpo-fast", sampling_steps=4, sde_window=2), checkpoint=path,
              resume=True)
    _, resumed = train(models, small(steps=2), checkpoint=path, resume=True)
    assert len(resumed.history) == 2


def test_diffusion_nft_resumes_exactly_with_its_old_policy(models, tmp_path):
    """The old policy (which samples) is part of the state: a resumed run samples and trains as if never stopped."""
    nft = dict(algorithm="diffusion-nft")
    trainer, straight = train(models, small(steps=3, **nft), checkpoint=tmp_path / "a.safetensors")
    old, live = trainer._finished.old_adapter, trainer._finished.adapter
    assert set(old) == set(live) and any(not torch.equal(old[k], live[k]) for k in old)  # it lags the LoRA
    train(models, small(steps=1, **nft), checkpoint=tmp_path / "b.safetensors")
    again, resumed = train(models, small(steps=3, **nft), checkpoint=tmp_path / "b.safetensors", resume=True)
    assert all(torch.equal(straight.lora.tensors[k], resumed.lora.tensors[k]) for k in straight.lora.tensors)
    assert all(torch.equal(old[k], again._finished.old_adapter[k]) for k in old)
    assert [h["rewards"] for h in straight.history] == [h["rewards"] for h in resumed.history]


def test_metaquery_model_trains_on_prompts_and_edit_pairs(tiny_metaquery_dir):
    from unipic_core.models.loading import load_metaquery

    models = models_on_device(load_metaquery(tiny_metaquery_dir), tiny_metaquery_dir, torch.device("cpu"))
    _, t2i = train(models, small(steps=1))
    pairs = edit_pairs([torch.rand(64, 64, 3)], ["make it snow"])
    _, edit = train(models, small(steps=1), pairs, edit_consistency_reward("l2"))
    assert t2i.lora.info["base_model"] == edit.lora.info["base_model"] == "UniPic2-tiny-MetaQuery"
    assert math.isfinite(t2i.history[0]["loss"]) and math.isfinite(edit.history[0]["loss"])
    assert any(v.abs().max() > 0 for k, v in edit.lora.tensors.items() if "lora_B" in k)


def test_the_clip_acts_only_from_the_second_update_of_a_step(models):
    _, one = train(models, small(steps=1, updates_per_step=1, learning_rate=5e-2))
    _, two = train(models, small(steps=1, updates_per_step=2, learning_rate=5e-2))
    assert one.history[0]["clip_fraction"] == 0.0  # freshly sampled data: every ratio is exactly 1
    assert two.history[0]["clip_fraction"] > 0.0  # after the first update the ratios leave [1 - eps, 1 + eps]


def test_any_seed_the_widget_allows_works(models):
    from unipic_core.training.training_plan import step_generator

    assert not torch.equal(torch.randn(3, generator=step_generator(2**31 - 1, 7, 2)),
                           torch.randn(3, generator=step_generator(2**31 - 1, 7, 3)))
    _, result = train(models, small(steps=1, seed=2**31 - 1))
    assert math.isfinite(result.history[0]["loss"])


# --- nothing lost: name clashes, resume checks, failures ----------------------------------------------------------


def test_trainer_refuses_to_overwrite_an_unresumed_lora(models, tmp_path):
    path = tmp_path / "mine.safetensors"
    state = path.with_suffix(".training-state")
    train(models, small(steps=1), checkpoint=path)
    lora, checkpoint = path.read_bytes(), state.read_bytes()
    with pytest.raises(LoRAError, match=r"mine\.safetensors already exists and 'resume' is off.*turn 'resume' on "
                                        r"to continue it, or choose another lora_name"):
        train(models, small(steps=1), checkpoint=path)
    path.unlink()  # the state alone is a run too
    with pytest.raises(LoRAError, match=r"mine\.training-state already exists and 'resume' is off"):
        train(models, small(steps=1), checkpoint=path)
    assert state.read_bytes() == checkpoint
    path.write_bytes(lora)
    assert path.read_bytes() == lora


def test_trainer_refuses_to_overwrite_a_lora_without_training_state(models, tmp_path):
    _, result = train(models, small(steps=1))
    path = save_lora(result.lora, tmp_path / "downloaded.safetensors")  # a LoRA saved by hand, no state
    before = path.read_bytes()
    with pytest.raises(LoRAError, match=r"downloaded\.safetensors exists but has no training state "
                                        r"\(downloaded\.training-state\).*choose another lora_name"):
        train(models, small(steps=1), checkpoint=path, resume=True)
    assert path.read_bytes() == before and not path.with_suffix(".training-state").exists()


def test_resume_refuses_another_reward_naming_it(models, tmp_path):
    path = tmp_path / "r.safetensors"
    train(models, small(steps=1), checkpoint=path)
    with pytest.raises(LoRAError, match=r"trained with the reward \['brightness x 1 \[target \(1, 1, 1\)\]'\], but "
                                        r"this run has \['colour x 1 \[target \(1, 0, 0\)\]'\]; connect the "
                                        r"checkpoint's reward"):
        train(models, small(steps=2), checkpoint=path, resume=True, reward=colour_reward((1, 0, 0)))
    doubled = combine([(colour_reward((1, 1, 1)), 2.0)])  # the same term, another weight
    with pytest.raises(LoRAError, match=r"this run has \['brightness x 2 \[target \(1, 1, 1\)\]'\]"):
        train(models, small(steps=2), checkpoint=path, resume=True, reward=doubled)


def test_resume_refuses_other_prompts(models, tmp_path):
    path = tmp_path / "p.safetensors"
    train(models, small(steps=1), checkpoint=path)
    with pytest.raises(LoRAError, match=r"trained with the training data 2 prompts, sha256 \w+, but this run has "
                                        r"3 prompts, sha256 \w+; give the checkpoint's prompts"):
        train(models, small(steps=2), PROMPTS + [TrainingItem("a green hill")], checkpoint=path, resume=True)
    with pytest.raises(LoRAError, match="this run has 2 prompts"):  # the same prompts in another order
        train(models, small(steps=2), PROMPTS[::-1], checkpoint=path, resume=True)


def test_resume_refuses_other_edit_source_pixels(models, tmp_path):
    path = tmp_path / "e.safetensors"
    source = torch.randint(0, 256, (64, 64, 3)) / 255  # 8-bit levels, as a loaded image file
    settings, reward = small(steps=1), edit_consistency_reward("l1")
    train(models, settings, edit_pairs([source], ["make it snow"]), reward, checkpoint=path)
    changed = source.clone()
    changed[0, 0, 0] = 0.0 if source[0, 0, 0] > 0.5 else 1.0  # one pixel, same instruction
    with pytest.raises(LoRAError, match=r"training data 1 edit pairs, sha256 \w+, but this run has 1 edit pairs"):
        train(models, small(steps=2), edit_pairs([changed], ["make it snow"]), reward, checkpoint=path, resume=True)
    # Float noise far below one 8-bit level (an upstream node that is not bit-reproducible) is the same image.
    nudged = (source + 1e-5 * (0.5 - source)).clamp(0, 1)
    _, resumed = train(models, small(steps=2), edit_pairs([nudged], ["make it snow"]), reward, checkpoint=path,
                       resume=True)
    assert [h["step"] for h in resumed.history] == [1, 2]


def test_resume_refuses_another_seed_or_algorithm_setting_naming_old_and_new(models, tmp_path):
    path = tmp_path / "s.safetensors"
    train(models, small(steps=1), checkpoint=path)
    with pytest.raises(LoRAError, match=r"has seed = 0, but this run asks for 7; set seed back to 0, or choose "
                                        r"another lora_name"):
        train(models, small(steps=2, seed=7), checkpoint=path, resume=True)
    with pytest.raises(LoRAError, match=r"has group_size = 4, but this run asks for 6"):
        train(models, small(steps=2, group_size=6), checkpoint=path, resume=True)
    with pytest.raises(LoRAError, match=r"has negative_prompt = '', but this run asks for 'blurry'"):
        train(models, small(steps=2, negative_prompt="blurry"), checkpoint=path, resume=True)


def test_resume_logs_a_changed_learning_rate(models, tmp_path, caplog):
    path = tmp_path / "lr.safetensors"
    train(models, small(steps=1), checkpoint=path)
    with caplog.at_level(logging.INFO, logger="unipic2"):  # steps, save_every and micro_batch change freely
        _, result = train(models, small(steps=2, learning_rate=5e-3, save_every=1, micro_batch=2), checkpoint=path,
                          resume=True)
    assert [h["step"] for h in result.history] == [1, 2]
    assert "with learning_rate 0.005 (the checkpoint ran with 0.01)" in caplog.text


def test_resume_with_another_start_lora_is_refused(models, tmp_path):
    _, first = train(models, small(steps=1), checkpoint=tmp_path / "stage1.safetensors")
    _, other = train(models, small(steps=1, seed=5))
    path = tmp_path / "stage2.safetensors"
    train(models, small(steps=1), checkpoint=path, start_lora=first.lora)
    with pytest.raises(LoRAError, match=r"trained with the start LoRA \('lora' input\) rank 4, sha256 \w+, but this "
                                        r"run has none; connect the LoRA the run started from"):
        train(models, small(steps=2), checkpoint=path, resume=True)
    with pytest.raises(LoRAError, match=r"start LoRA \('lora' input\) rank 4, sha256 (\w+), but this run has rank 4, "
                                        r"sha256 (?!\1)\w+;"):
        train(models, small(steps=2), checkpoint=path, resume=True, start_lora=other.lora)
    # A re-queued PDTR chain: the first stage hands over the same finished LoRA, and the second stage continues.
    requeued = load_lora(tmp_path / "stage1.safetensors")
    _, resumed = train(models, small(steps=2), checkpoint=path, resume=True, start_lora=requeued)
    assert [h["step"] for h in resumed.history] == [1, 2]


def test_requeue_of_a_finished_run_returns_its_lora_curves_and_samples(models, tmp_path):
    path = tmp_path / "done.safetensors"
    _, finished = train(models, small(steps=2), checkpoint=path)
    written = path.stat().st_mtime_ns
    _, again = train(models, small(steps=2), checkpoint=path, resume=True)
    assert again.history == finished.history
    for key, value in finished.lora.tensors.items():
        assert torch.equal(again.lora.tensors[key], value), key
    assert again.samples.shape == finished.samples.shape and again.samples.std() > 0
    assert torch.allclose(again.samples, finished.samples, atol=0.5 / 255 + 1e-6)  # kept as uint8
    assert path.stat().st_mtime_ns == written  # nothing to write again


def test_curves_plot_the_union_of_reward_names():
    from unipic_core.training.curves import COLOURS, plot_curves

    def step(n, **rewards):
        return {"step": n, "rewards": {name: (mean, 0.0) for name, mean in rewards.items()}, "loss": 0.1, "kl": 0.0}

    # 'a' has no value at step 2 (a resumed run under another reward), 'b' none at step 1.
    history = [step(1, a=0.0, total=0.5), step(2, b=1.0, total=0.5), step(3, a=0.0, b=1.0, total=0.5)]
    image = (plot_curves(history, width=768, height=512)[0] * 255).round()

    def colour_at(x, y):
        return [n for n, c in enumerate(COLOURS) if torch.equal(image[y, x], torch.tensor(c, dtype=image.dtype))]

    # The reward panel spans x 10..757 for steps 1..3 and y 247 (its minimum, 0.0) .. 24 (its maximum, 1.0);
    # colours in first-seen order: a, total, b.
    assert colour_at(383, 24) == [2]  # b's point at step 2
    assert colour_at(10, 247) == colour_at(757, 247) == [0]  # a's points at steps 1 and 3
    assert colour_at(383, 247) == []  # and no line between them: a gap at step 2


def failing_reward(at_call: int, calls: list) -> Reward:
    """Brightness, but the at_call-th scoring raises (with one prompt per step, that is step at_call)."""
    def score(images, prompts, sources):
        calls.append(len(images))
        if len(calls) == at_call:
            raise RuntimeError("reward server down")
        return images.float().mean(dim=(1, 2, 3))

    return Reward([RewardTerm("brightness", 1.0, score)])


def assert_same_state(path, reference):
    """Adapter, optimizer state, step and history (but its timings) bit for bit."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            return [value]
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
        return [t for v in items for t in tensors(v)]

    mine, theirs = load_state(path), load_state(reference)
    assert mine.step == theirs.step
    assert [{**h, "elapsed": 0} for h in mine.history] == [{**h, "elapsed": 0} for h in theirs.history]
    assert mine.adapter.keys() == theirs.adapter.keys()
    assert all(torch.equal(mine.adapter[k], theirs.adapter[k]) for k in mine.adapter)
    ours, other = tensors(mine.optimizer), tensors(theirs.optimizer)
    assert len(ours) == len(other) > 0 and all(torch.equal(a, b) for a, b in zip(ours, other))
    lora, reference_lora = load_lora(path.with_suffix(".safetensors")), load_lora(reference.with_suffix(".safetensors"))
    assert all(torch.equal(lora.tensors[k], v) for k, v in reference_lora.tensors.items())


@pytest.mark.parametrize("where", ["reward", "second_update"])
def test_a_failing_reward_keeps_the_finished_steps(models, tmp_path, where):
    """save_every 0: an error in step 3 -- in the reward, or between the two optimizer updates of the step, with
    the adapter half updated -- leaves the checkpoint of step 2 exactly as a run of 2 steps writes it."""
    reference = tmp_path / "two_steps.safetensors"
    train(models, small(steps=2), reward=failing_reward(0, []), checkpoint=reference)
    path = tmp_path / "failed.safetensors"
    trainer = GRPOTrainer(models, failing_reward(3 if where == "reward" else 0, []), PROMPTS, small(steps=5),
                          checkpoint=path)
    if where == "second_update":
        updates, update = [], trainer.optimizer.step

        def failing_update(*args, **kwargs):
            updates.append(1)
            if len(updates) == 6:  # two per step: step 3's second
                raise RuntimeError("CUDA error: an illegal memory access")
            return update(*args, **kwargs)

        trainer.optimizer.step = failing_update
    try:
        with pytest.raises(RuntimeError, match="reward server down|illegal memory access"):
            trainer.run()
    finally:
        trainer.close()
    assert_same_state(path.with_suffix(".training-state"), reference.with_suffix(".training-state"))
    _, resumed = train(models, small(steps=3), reward=failing_reward(0, []), checkpoint=path, resume=True)
    assert [h["step"] for h in resumed.history] == [1, 2, 3]


def test_a_failing_checkpoint_write_does_not_hide_the_error(models, tmp_path, monkeypatch):
    path = tmp_path / "full_disk.safetensors"
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("unipic_core.training.training_state.torch.save", disk_full)
    with pytest.raises(RuntimeError, match="reward server down") as raised:
        train(models, small(steps=3), reward=failing_reward(2, []), checkpoint=path)
    assert any("checkpoint of step 1 could not be written either" in note and "No space left" in note
               for note in raised.value.__notes__)


def test_bad_lora_folder_is_refused_before_step_one(models, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    calls = []
    with pytest.raises(LoRAError, match=r"cannot write the LoRA into .*a_file.*make that folder writable or choose "
                                        r"another lora_name"):
        train(models, small(steps=1), reward=failing_reward(0, calls), checkpoint=tmp_path / "a_file" / "x.safetensors")
    assert calls == []  # refused before any sampling


MALFORMED = {
    "a missing history": (lambda p: p.pop("history"), "'history' is missing"),
    "a step of the wrong type": (lambda p: p.update(step="1"), "'step' is str, expected int"),
    "a history shorter than its steps": (lambda p: p.update(history=[]), "'history' has 0 entries for 1 steps"),
    "a broken history entry": (lambda p: p["history"][0].pop("rewards"), "history entry 1 is not a step record"),
    "a partial adapter": (lambda p: p["adapter"].pop(sorted(p["adapter"])[0]), "its adapter lacks tensors for this "
                          r"model \(1, e\.g\. transformer\."),
    "a foreign adapter tensor": (lambda p: p["adapter"].update({"transformer.x.lora_A.weight": torch.zeros(1)}),
                                 r"its adapter has unknown tensors for this model \(1, e\.g\. transformer\.x\."),
    "an optimizer state for another adapter": (lambda p: p["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)),
                                               "its optimizer state entry 0 does not fit the adapter"),
    "an adapter of the wrong type": (lambda p: p.update(adapter=list(p["adapter"].values())),
                                     "'adapter' is list, expected dict"),
}


def test_malformed_training_state_is_named(models, tmp_path):
    path = tmp_path / "m.safetensors"
    state = path.with_suffix(".training-state")
    train(models, small(steps=1), checkpoint=path)
    good = state.read_bytes()
    for case, (damage, problem) in MALFORMED.items():
        payload = torch.load(state, weights_only=True)
        damage(payload)
        torch.save(payload, state)
        with pytest.raises(LoRAError, match=rf"the training checkpoint .*m\.training-state is not usable: {problem}.*; "
                                            r"delete it and its LoRA .* to start that lora_name afresh, or choose another lora_name"):
            train(models, small(steps=2), checkpoint=path, resume=True)
        state.write_bytes(good)
    state.write_bytes(b"\0" * 100)
    with pytest.raises(LoRAError, match=r"m\.training-state is not usable: it cannot be read"):
        train(models, small(steps=2), checkpoint=path, resume=True)


def test_a_state_from_before_run_fingerprints_resumes_with_a_warning(models, tmp_path, caplog):
    path = tmp_path / "old.safetensors"
    state = path.with_suffix(".training-state")
    train(models, small(steps=1), checkpoint=path)
    payload = torch.load(state, weights_only=True)
    del payload["run"], payload["samples"]  # as written before this check existed
    torch.save(payload, state)
    with caplog.at_level(logging.WARNING, logger="unipic2"):
        _, result = train(models, small(steps=2), checkpoint=path, resume=True, reward=colour_reward((1, 0, 0)))
    assert "predates run fingerprints; resuming without checking that reward, data and start LoRA" in caplog.text
    assert [h["step"] for h in result.history] == [1, 2]
