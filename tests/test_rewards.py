"""Offline rewards: JPEG size, colour / brightness, edit consistency with a mask, and the Qwen2.5-VL judge."""

import pytest
import torch

from unipic_core.models.metaquery import yes_probability
from unipic_core.rewards import (colour_reward, combine, edit_consistency_reward, jpeg_kilobytes, jpeg_reward,
                                 judge_reward)


def test_jpeg_rewards_prefer_simple_or_detailed_images():
    flat, noisy = torch.full((1, 64, 64, 3), 0.5), torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    sizes = jpeg_kilobytes(images)
    assert sizes[0] < sizes[1]
    compress = jpeg_reward().score(images, ["", ""], None)["jpeg_compressibility"]
    detail = jpeg_reward(incompressible=True).score(images, ["", ""], None)["jpeg_incompressibility"]
    assert torch.equal(compress, -sizes) and torch.equal(detail, sizes)


def test_colour_reward_is_one_at_the_target_and_brightness_for_white():
    white, grey = torch.ones(1, 8, 8, 3), torch.full((1, 8, 8, 3), 0.25)
    scores = colour_reward((1.0, 1.0, 1.0)).score(torch.cat([white, grey]), ["", ""], None)["brightness"]
    assert torch.allclose(scores, torch.tensor([1.0, 0.25]))
    red = colour_reward((1.0, 0.0, 0.0)).score(torch.tensor([[[[1.0, 0.0, 0.0]]]]), [""], None)["colour"]
    assert red.item() == 1.0
    with pytest.raises(ValueError, match="three values in 0..1"):
        colour_reward((2.0, 0.0, 0.0))


def test_edit_consistency_ignores_the_masked_region():
    source = torch.rand(1, 32, 32, 3)
    edited = source.clone()
    edited[:, :16] = 1 - edited[:, :16]  # the top half changed
    mask = torch.zeros(1, 32, 32)
    mask[:, :16] = 1
    unmasked = edit_consistency_reward("l1").score(edited, [""], source)["edit_consistency_l1"]
    masked = edit_consistency_reward("l1", mask).score(edited, [""], source)["edit_consistency_l1"]
    assert masked.item() == pytest.approx(1.0) and unmasked.item() < 0.9
    same_size_later = edit_consistency_reward("l2").score(edited, [""], torch.nn.functional.interpolate(
        source.movedim(-1, 1), size=(64, 64)).movedim(1, -1))["edit_consistency_l2"]
    assert 0 < same_size_later.item() < 1  # a source of another size is resized to the result


def test_combined_terms_are_weighted_and_uniquely_named():
    bright = colour_reward((1.0, 1.0, 1.0))
    reward = combine([(bright, 2.0), (bright, -1.0)])
    assert reward.names == ["brightness", "brightness_2"]
    scores = reward.score(torch.full((2, 8, 8, 3), 0.5), ["", ""], None)
    assert torch.allclose(reward.total(scores), torch.full((2,), 0.5))


def test_judge_gives_a_yes_probability_per_image(tiny_metaquery):
    encoder = tiny_metaquery.mllm
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    reward = judge_reward(lambda imgs, question: yes_probability(encoder, imgs, question))
    t2i = reward.score(images, ["a red fox", "a blue lake"], None)["judge"]
    edit = reward.score(images, ["add snow", "add snow"], images.flip(0))["judge"]
    assert t2i.shape == edit.shape == (2,)
    assert bool(((t2i > 0) & (t2i < 1)).all()) and bool(((edit > 0) & (edit < 1)).all())
    assert not torch.equal(t2i, edit)  # the edit judge also sees the source
    again = reward.score(images, ["a red fox", "a blue lake"], None)["judge"]
    assert torch.equal(t2i, again)
