"""The GRPO training loop on the tiny model: learning, exact resume, edit pairs, and bad input."""

import math

import pytest
import torch

from unipic_core.grpo_training import GRPOSettings, GRPOTrainer, Hooks, TrainingItem
from unipic_core.loading import load_kontext
from unipic_core.lora import LoRAError, load_lora
from unipic_core.rewards import Reward, RewardTerm, colour_reward, edit_consistency_reward
from unipic_core.training_data import edit_pairs, read_prompts
from unipic_core.training_models import models_on_device

PROMPTS = [TrainingItem("a red fox"), TrainingItem("a blue lake")]


def small(**overrides) -> GRPOSettings:
    values = dict(steps=2, group_size=4, sampling_steps=3, resolution=64, lora_rank=4, lora_alpha=12,
                  learning_rate=1e-2, save_every=0)
    return GRPOSettings(**{**values, **overrides})


@pytest.fixture
def models(tiny_kontext_dir):
    """Freshly loaded tiny components (training puts an adapter into the DiT)."""
    return models_on_device(load_kontext(tiny_kontext_dir), tiny_kontext_dir, torch.device("cpu"))


def train(models, settings, data=PROMPTS, reward=None, **kwargs):
    trainer = GRPOTrainer(models, reward or colour_reward((1, 1, 1)), data, settings, **kwargs)
    try:
        return trainer, trainer.run()
    finally:
        trainer.close()


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

    monkeypatch.setattr("unipic_core.training_state.torch.save", disk_full)
    with pytest.raises(LoRAError, match="No space left"):
        train(models, small(steps=2), checkpoint=path, resume=True)
    assert path.with_suffix(".training-state").read_bytes() == state and path.read_bytes() == lora


def test_brightness_reward_rises_within_twenty_five_steps(models):
    """Learning test. The tiny random VAE decodes any latent to a brightness within about 0.448..0.455, too flat
    for any policy to move, so here pixels are a fixed map of the latent (sigmoid of its first three channels);
    the DiT, LoRA, SDE sampling, reward, advantages and AdamW are the real ones."""
    models.decode = lambda latents: torch.sigmoid(latents[:, :3].float()).movedim(1, -1)
    # One update per step: with this test's large learning rate, a second update would be mostly clipped away.
    settings = small(steps=25, group_size=8, sampling_steps=4, lora_rank=8, lora_alpha=16, learning_rate=3e-2,
                     beta=0.0, updates_per_step=1)
    _, result = train(models, settings)
    means = [h["rewards"]["brightness"][0] for h in result.history]
    stds = [h["rewards"]["brightness"][1] for h in result.history]
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    # Margin: 0.025, about 8 standard errors of a 3-step mean at the start (~0.003 with G = 8 images a step), so
    # the rise cannot come from sampling noise. Measured with seeds 0, 1, 2: rises of 0.043, 0.063, 0.081.
    standard_error = (sum(stds[:3]) / 3) / math.sqrt(3 * settings.group_size)
    assert last - first > max(5 * standard_error, 0.025), (means, standard_error)


def test_metaquery_model_trains_on_prompts_and_edit_pairs(tiny_metaquery_dir):
    from unipic_core.loading import load_metaquery

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
    from unipic_core.grpo_training import step_generator

    assert not torch.equal(torch.randn(3, generator=step_generator(2**31 - 1, 7, 2)),
                           torch.randn(3, generator=step_generator(2**31 - 1, 7, 3)))
    _, result = train(models, small(steps=1, seed=2**31 - 1))
    assert math.isfinite(result.history[0]["loss"])
