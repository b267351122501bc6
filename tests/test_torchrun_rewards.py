"""grpo_torchrun's --reward: NAME[=WEIGHT] entries, the learned rewards read from --reward-models under their
published names (downloaded there when absent) and scoring as the reward functions do, and a training run with them."""

import argparse
from pathlib import Path

import pytest
import torch

from unipic_core.models.lora import load_lora
from unipic_core.models.qwen25vl_lora import lora_added, read_qwen25vl_lora
from unipic_core.models.repos import (AESTHETIC_URL, CLIP_FILES, CLIP_L14_REPO, EDITSCORE_REPO,
                                      PICKSCORE_PROCESSOR_REPO, PICKSCORE_REPO, PROCESSOR_FILES)
from unipic_core.rewards import colour_reward
from unipic_core.rewards.object_reward import load_owlv2, object_scores, parse_metadata
from unipic_core.rewards.reward_models import (aesthetic_score, clip_score, load_aesthetic_mlp, load_clip_reward,
                                               pickscore)
from unipic_core.tiny_rewards import (write_aesthetic_mlp, write_clip_processor, write_clip_reward_folder,
                                      write_editscore_adapter, write_owlv2_folder)
from unipic_core.training import grpo_torchrun, torchrun_rewards
from unipic_core.training.torchrun_rewards import build_reward, fetch_models, reward_choice

PROMPTS = ["a red fox", "a blue lake", "two cats"]
GENEVAL = '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"}'


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_metaquery_dir) -> Path:
    """The learned rewards' tiny models under their published names, as the nodes download them."""
    root = tmp_path_factory.mktemp("models") / "unipic2"
    write_editscore_adapter(root / "EditScore-7B", tiny_metaquery_dir / "Qwen2.5-VL-tiny")
    write_clip_reward_folder(root / "PickScore_v1", seed=1)
    write_clip_processor(root / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    write_clip_reward_folder(root / "clip-vit-large-patch14", seed=2)
    write_aesthetic_mlp(root / "sac+logos+ava1-l14-linearMSE.pth", embed_dim=16)
    write_owlv2_folder(root / "owlv2-base-patch16-ensemble")
    return root


def pictures(count: int = len(PROMPTS)) -> torch.Tensor:
    return torch.rand(count, 64, 96, 3, generator=torch.Generator().manual_seed(0))


def test_entries_are_names_with_optional_weights():
    assert reward_choice("pickscore") == ("pickscore", 1.0)
    assert reward_choice("objects=0.25") == ("objects", 0.25)
    with pytest.raises(argparse.ArgumentTypeError, match="unknown reward 'pickscor'; choose from brightness"):
        reward_choice("pickscor")
    for entry in ("aesthetic=high", "aesthetic=nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number, e.g. aesthetic=0.5"):
            reward_choice(entry)


def test_a_single_rule_based_reward_keeps_its_fingerprint_so_older_runs_resume(models_dir):
    reward = build_reward([("brightness", 1.0)], models_dir, torch.device("cpu"))
    assert reward.fingerprint == colour_reward((1.0, 1.0, 1.0)).fingerprint == ["brightness x 1 [target (1, 1, 1)]"]


def test_learned_rewards_score_as_the_reward_functions_with_their_weights(models_dir):
    reward = build_reward([("pickscore", 0.5), ("clipscore", 1.0), ("aesthetic", 2.0), ("brightness", 3.0)],
                          models_dir, torch.device("cpu"))
    images = pictures()
    scores = reward.score(images, PROMPTS, None)
    pick = load_clip_reward(models_dir / "PickScore_v1", models_dir / "CLIP-ViT-H-14-laion2B-s32B-b79K")
    clip = load_clip_reward(models_dir / "clip-vit-large-patch14")
    expected = {"pickscore": pickscore(pick, images, PROMPTS), "clipscore": clip_score(clip, images, PROMPTS),
                "aesthetic": aesthetic_score(clip, load_aesthetic_mlp(models_dir / "sac+logos+ava1-l14-linearMSE.pth"),
                                             images),
                "brightness": colour_reward((1.0, 1.0, 1.0)).score(images, PROMPTS, None)["brightness"]}
    assert list(scores) == list(expected)
    for name, value in expected.items():
        assert torch.allclose(scores[name], value, atol=1e-5), name
    total = 0.5 * expected["pickscore"] + expected["clipscore"] + 2 * expected["aesthetic"] + 3 * expected["brightness"]
    assert torch.allclose(reward.total(scores), total, atol=1e-4)


def test_clipscore_and_aesthetic_share_one_clip(models_dir, monkeypatch):
    import unipic_core.rewards.reward_models as reward_models

    loaded = []
    load = reward_models.load_clip_reward
    monkeypatch.setattr(reward_models, "load_clip_reward", lambda folder, *args: loaded.append(folder) or load(
        folder, *args))
    build_reward([("clipscore", 1.0), ("aesthetic", 1.0), ("pickscore", 1.0)], models_dir, torch.device("cpu"))
    assert loaded == [models_dir / "clip-vit-large-patch14", models_dir / "PickScore_v1"]


def test_the_object_reward_reads_the_prompts_metadata(models_dir):
    reward = build_reward([("objects", 1.0)], models_dir, torch.device("cpu"))
    images, metadata = pictures(2), [parse_metadata(GENEVAL, "line 1")] * 2
    scores = reward.score(images, [metadata[0].prompt] * 2, None, metadata)["objects"]
    owl = load_owlv2(models_dir / "owlv2-base-patch16-ensemble")
    assert torch.equal(scores, object_scores(owl, images, metadata))


def test_missing_models_are_downloaded_into_the_folder_and_present_ones_are_not(models_dir, tmp_path, monkeypatch):
    repos, files = [], []
    monkeypatch.setattr(torchrun_rewards, "download_repo",
                        lambda repo, destination, tqdm_class, patterns: repos.append((repo, destination, patterns)))
    monkeypatch.setattr(torchrun_rewards, "download_file", lambda url, destination: files.append((url, destination)))
    (tmp_path / "PickScore_v1").mkdir()  # an interrupted download: resumed, not taken for the model
    fetch_models(["pickscore", "aesthetic", "brightness"], tmp_path)
    assert sorted(repos) == sorted([(PICKSCORE_REPO, tmp_path / "PickScore_v1", CLIP_FILES),
                                    (PICKSCORE_PROCESSOR_REPO, tmp_path / "CLIP-ViT-H-14-laion2B-s32B-b79K",
                                     PROCESSOR_FILES),
                                    (CLIP_L14_REPO, tmp_path / "clip-vit-large-patch14", CLIP_FILES)])
    assert files == [(AESTHETIC_URL, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")]
    repos.clear(), files.clear()
    fetch_models(["pickscore", "clipscore", "aesthetic", "objects", "editscore"], models_dir)
    assert repos == files == []


def test_a_run_trains_on_the_weighted_learned_and_rule_based_rewards(tiny_kontext_dir, models_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    output = tmp_path / "lora.safetensors"
    grpo_torchrun.main(["--checkpoint", str(tiny_kontext_dir), "--prompts", str(prompts), "--output", str(output),
                        "--reward", "pickscore=0.5", "brightness", "--reward-models", str(models_dir), "--dtype",
                        "fp32", "--steps", "1", "--group-size", "2", "--sampling-steps", "2", "--resolution", "64",
                        "--lora-rank", "2", "--lora-alpha", "4"])
    lora = load_lora(output)
    assert lora.info["rewards"] == ["pickscore", "brightness"]
    assert any(value.abs().max() > 0 for key, value in lora.tensors.items() if "lora_B" in key)


def test_editscore_adds_its_adapter_to_the_metaquery_mllm_only_while_it_scores(tiny_metaquery, tiny_metaquery_dir,
                                                                              models_dir):
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = tiny_metaquery.mllm.mllm
    ids = torch.randint(0, model.config.text_config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with lora_added(model, read_qwen25vl_lora(models_dir / "EditScore-7B", model, EDITSCORE_REPO)):
            adapted = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_metaquery_dir / "Qwen2.5-VL-tiny"),
                                                                  dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(models_dir / "EditScore-7B")).merge_and_unload().eval()
        published = merged(input_ids=ids).logits  # EditScore's own loading: merge_and_unload
    assert torch.equal(before, after)
    assert (adapted - before).abs().max() > 1e-3
    assert torch.allclose(adapted, published, atol=1e-5)


def test_editscore_scores_with_its_adapter_added_and_is_refused_without_a_metaquery(tiny_metaquery, models_dir,
                                                                                     tiny_kontext_dir, tmp_path,
                                                                                     monkeypatch):
    import unipic_core.rewards.editscore as editscore_module

    hooked = []

    def spy(encoder, *args, **kwargs):
        hooked.append(sum(len(m._forward_hooks) for m in encoder.mllm.modules()))
        return score(encoder, *args, **kwargs)

    score = editscore_module.editscore
    monkeypatch.setattr(editscore_module, "editscore", spy)
    reward = build_reward([("editscore", 1.0)], models_dir, torch.device("cpu"), tiny_metaquery.mllm)
    assert reward.names == ["editscore"] and reward.terms[0].needs_sources
    scores = reward.score(pictures(1), ["make it snow"], pictures(1))["editscore"]
    assert scores.shape == (1,) and torch.isfinite(scores).all()
    adapted = len(read_qwen25vl_lora(models_dir / "EditScore-7B", tiny_metaquery.mllm.mllm, EDITSCORE_REPO))
    assert hooked == [adapted] and sum(len(m._forward_hooks) for m in tiny_metaquery.mllm.mllm.modules()) == 0
    with pytest.raises(ValueError, match="'editscore' reward runs on the MetaQuery's Qwen2.5-VL-7B-Instruct"):
        build_reward([("editscore", 1.0)], models_dir, torch.device("cpu"))
    monkeypatch.setattr(torchrun_rewards, "download_repo", lambda *args: pytest.fail("downloaded before refusing"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    with pytest.raises(ValueError, match="'editscore' reward runs on the MetaQuery's"):  # before any download
        grpo_torchrun.main(["--checkpoint", str(tiny_kontext_dir), "--prompts", str(prompts), "--output",
                            str(tmp_path / "x.safetensors"), "--reward", "editscore", "--reward-models",
                            str(tmp_path / "empty")])


def test_a_metaquery_edit_run_trains_on_editscore(tiny_metaquery_dir, models_dir, tmp_path):
    from PIL import Image

    images = tmp_path / "sources"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(images / "red.png")
    instructions = tmp_path / "instructions.txt"
    instructions.write_text("make it blue\n")
    output = tmp_path / "edit_lora.safetensors"
    grpo_torchrun.main(["--checkpoint", str(tiny_metaquery_dir), "--edit-images", str(images), "--edit-instructions",
                        str(instructions), "--output", str(output), "--reward", "editscore", "edit-consistency=0.5",
                        "--reward-models", str(models_dir), "--dtype", "fp32", "--steps", "1", "--group-size", "2",
                        "--sampling-steps", "2", "--resolution", "64", "--lora-rank", "2", "--lora-alpha", "4"])
    assert load_lora(output).info["rewards"] == ["editscore", "edit_consistency_l1"]
