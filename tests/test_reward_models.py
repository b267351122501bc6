"""Learned rewards (PickScore, CLIPScore, LAION's aesthetic predictor): tiny checkpoints in the published layouts
load strictly, score exactly as the published references compute, refuse bad inputs clearly, and run as nodes
under ComfyUI's memory manager."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from unipic_core.inference.images import to_pil
from unipic_core.models.loading import CheckpointError, download_file
from unipic_core.models.repos import AESTHETIC_CHOICE, CLIP_L14_REPO, PICKSCORE_PROCESSOR_REPO, PICKSCORE_REPO
from unipic_core.rewards.reward_models import (aesthetic_score, check_aesthetic_pair, clip_score, load_aesthetic_mlp,
                                               load_clip_reward, pickscore)
from unipic_core.tiny_rewards import write_aesthetic_mlp, write_clip_reward_folder

CLIP_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json", "vocab.json",
              "merges.txt"}
PROMPTS = ["a red fox", "a blue lake", "a cat", "snow", "a photo", "x"]
TINY_CLIP, TINY_MLP = "CLIP-tiny-reward", "aesthetic-tiny.pth"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    # seed 3: the tiny model gives these prompts both negative (clamped) and positive CLIPScore cosines
    return write_clip_reward_folder(tmp_path_factory.mktemp("reward") / TINY_CLIP, seed=3)


@pytest.fixture(scope="module")
def mlp_path(tmp_path_factory) -> Path:
    return write_aesthetic_mlp(tmp_path_factory.mktemp("reward") / TINY_MLP, embed_dim=16)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip_reward(clip_dir)


def pictures(count: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 80, 112, 3, generator=torch.Generator().manual_seed(seed))


def reference_embeddings(folder: Path, images: torch.Tensor, texts: list[str]):
    """The references' path: a CLIPModel and processor as their scripts load them (PIL preprocessing), text
    padded and truncated to 77 tokens, embeddings divided by their norms."""
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(str(folder)),
                              tokenizer=CLIPTokenizer.from_pretrained(str(folder)))
    with torch.no_grad():
        image = model.get_image_features(**processor(images=[to_pil(i) for i in images], return_tensors="pt"))
        text = model.get_text_features(**processor(text=texts, padding=True, truncation=True, max_length=77,
                                                   return_tensors="pt"))
    image, text = image.pooler_output, text.pooler_output
    return model, text / torch.norm(text, dim=-1, keepdim=True), image / torch.norm(image, dim=-1, keepdim=True)


def copy_without(folder: Path, tmp_path: Path, *names: str) -> Path:
    copy = shutil.copytree(folder, tmp_path / folder.name)
    for name in names:
        (copy / name).unlink()
    return copy


# --- the tiny checkpoints load strictly ------------------------------------------------------------------------

def test_tiny_clip_folder_has_the_published_files_and_loads_strictly(clip_dir, clip, tmp_path):
    assert {p.name for p in clip_dir.iterdir()} == CLIP_FILES
    assert isinstance(clip.model, CLIPModel) and not clip.model.training
    assert isinstance(clip.processor.image_processor, CLIPImageProcessorPil)  # PIL bicubic, as the references
    assert clip.processor.image_processor.crop_size == {"height": 224, "width": 224}
    weights = load_file(str(clip_dir / "model.safetensors"))
    extra = copy_without(clip_dir, tmp_path)
    save_file({**weights, "text_projection.bias": torch.zeros(16)}, str(extra / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys: text_projection.bias"):
        load_clip_reward(extra)
    shutil.rmtree(extra)
    missing = copy_without(clip_dir, tmp_path)
    save_file({k: v for k, v in weights.items() if k != "logit_scale"}, str(missing / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: logit_scale"):
        load_clip_reward(missing)


def test_tiny_aesthetic_mlp_has_the_published_keys(mlp_path):
    weights = torch.load(str(mlp_path), weights_only=True)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "layers.0.weight": (1024, 16), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,), "layers.6.weight": (16, 64),
        "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    mlp = load_aesthetic_mlp(mlp_path)
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in weights.items()) and not mlp.training


# --- scores equal the published formulas ----------------------------------------------------------------------

def test_pickscore_is_logit_scale_times_cosine(clip_dir, clip):
    images = pictures()
    model, text, image = reference_embeddings(clip_dir, images, PROMPTS)
    expected = model.logit_scale.exp() * (text @ image.T).diagonal()
    ours = pickscore(clip, images, PROMPTS)
    assert ours.dtype == torch.float32 and ours.shape == (len(PROMPTS),)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5)


def test_clip_score_is_hessels_clamped_cosine_with_the_caption_prefix(clip_dir, clip):
    images = pictures()
    _, text, image = reference_embeddings(clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    cos = (text * image).sum(dim=-1).numpy()
    expected = 2.5 * np.clip(cos, 0, None)
    assert (cos < 0).any() and (cos > 0).any()  # both branches of the clamp are exercised
    assert np.allclose(clip_score(clip, images, PROMPTS).numpy(), expected, rtol=0, atol=1e-5)


def test_aesthetic_score_is_the_mlp_on_the_normalised_image_embedding(clip_dir, clip, mlp_path):
    images = pictures()
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = CLIPImageProcessorPil.from_pretrained(str(clip_dir))
    with torch.no_grad():
        features = model.get_image_features(**processor(images=[to_pil(i) for i in images],
                                                        return_tensors="pt")).pooler_output.numpy()
    norms = np.linalg.norm(features, 2, -1)
    norms[norms == 0] = 1
    weights = torch.load(str(mlp_path), weights_only=True)
    layers = [torch.nn.Linear(16, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
              torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)]
    head = torch.nn.Sequential(*layers).eval()
    head.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()})
    with torch.no_grad():
        expected = head(torch.from_numpy(features / norms[:, None]).float())[:, 0]
    assert torch.allclose(aesthetic_score(clip, load_aesthetic_mlp(mlp_path), images), expected, rtol=0, atol=1e-5)


def test_scores_follow_the_image_and_repeat_exactly(clip, mlp_path):
    mlp = load_aesthetic_mlp(mlp_path)
    images, others = pictures(), pictures(seed=1)
    for score in (lambda x: pickscore(clip, x, PROMPTS), lambda x: aesthetic_score(clip, mlp, x)):
        first = score(images)
        assert torch.equal(first, score(images))  # eval mode: no dropout
        assert (first != score(others)).all()
        assert len(set(first.tolist())) == len(PROMPTS)


def test_half_precision_scores_stay_close_to_fp32(clip_dir, clip, mlp_path):
    images, mlp = pictures(), load_aesthetic_mlp(mlp_path)
    for dtype in (torch.bfloat16, torch.float16):
        half = load_clip_reward(clip_dir, dtype=dtype)
        assert half.model.dtype == dtype
        assert torch.allclose(pickscore(half, images, PROMPTS), pickscore(clip, images, PROMPTS), atol=0.1)
        assert torch.allclose(aesthetic_score(half, mlp, images), aesthetic_score(clip, mlp, images), atol=0.01)


# --- bad inputs get clear errors ------------------------------------------------------------------------------

def test_a_folder_that_is_no_clip_is_refused(tmp_path, tiny_kontext_dir):
    with pytest.raises(CheckpointError, match="is not a transformers CLIP folder .* download openai/clip-vit"):
        load_clip_reward(tiny_kontext_dir)
    with pytest.raises(CheckpointError, match="is not a transformers CLIP folder .* yuvalkirstain/PickScore_v1"):
        load_clip_reward(tmp_path / "nothing", repo=PICKSCORE_REPO)


@pytest.mark.parametrize("missing", ["preprocessor_config.json", "vocab.json"])
def test_missing_processor_files_are_named(clip_dir, tmp_path, missing):
    folder = copy_without(clip_dir, tmp_path, missing)
    with pytest.raises(CheckpointError, match=r"has no CLIP processor files \(preprocessor_config.json, and "
                                              r"tokenizer.json or vocab.json \+ merges.txt\); copy them from openai"):
        load_clip_reward(folder)
    assert load_clip_reward(folder, processor_folder=clip_dir).model is not None  # a processor from elsewhere
    with pytest.raises(CheckpointError, match="copy them from laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        load_clip_reward(clip_dir, folder, repo=PICKSCORE_REPO, processor_repo=PICKSCORE_PROCESSOR_REPO)


def test_missing_weights_are_named(clip_dir, tmp_path):
    with pytest.raises(CheckpointError, match="'CLIP-tiny-reward/model.safetensors' .* not found"):
        load_clip_reward(copy_without(clip_dir, tmp_path, "model.safetensors"))


def test_an_mlp_file_with_other_keys_is_refused(mlp_path, tmp_path):
    weights = torch.load(str(mlp_path), weights_only=True)
    renamed = tmp_path / "renamed.pth"
    torch.save({k.replace("layers.7", "layers.8"): v for k, v in weights.items()}, str(renamed))
    with pytest.raises(CheckpointError, match=r"do not match the aesthetic MLP's layout \(layers.0/2/4/6/7\) -- "
                                              "missing: layers.7.bias, layers.7.weight; unexpected: layers.8.bias"):
        load_aesthetic_mlp(renamed)
    narrow = tmp_path / "narrow.pth"
    torch.save({**weights, "layers.6.bias": torch.zeros(8)}, str(narrow))
    with pytest.raises(CheckpointError, match="weight shapes do not match .*layers.6.bias"):
        load_aesthetic_mlp(narrow)
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="is not the improved aesthetic predictor's MLP"):
        load_aesthetic_mlp(other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a readable torch state dict"):
        load_aesthetic_mlp(garbage)
    with pytest.raises(CheckpointError, match="not found; download sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_aesthetic_mlp(tmp_path / "absent.pth")


def test_an_mlp_for_another_clip_width_is_refused(clip, tmp_path):
    mlp = load_aesthetic_mlp(write_aesthetic_mlp(tmp_path / "wide.pth", embed_dim=768))
    with pytest.raises(CheckpointError, match="takes 768-wide CLIP embeddings but tiny makes 16-wide"):
        check_aesthetic_pair(clip, mlp, "tiny", "wide.pth")


def test_one_prompt_per_image(clip):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        pickscore(clip, pictures(2), ["a cat"])


def test_file_download_publishes_only_a_complete_file(mlp_path, tmp_path):
    copied = download_file(mlp_path.as_uri(), tmp_path / "models" / TINY_MLP)
    assert copied.read_bytes() == mlp_path.read_bytes()
    with pytest.raises(CheckpointError, match="could not download http://127.0.0.1:9/x .* copy it to"):
        download_file("http://127.0.0.1:9/x", tmp_path / "absent.pth")
    assert not list(tmp_path.glob("absent*"))


# --- the nodes in the real host -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_host(host, clip_dir, mlp_path):
    models = host.loras.parent / "unipic2"  # the tests' models/unipic2
    (models / TINY_CLIP).symlink_to(clip_dir, target_is_directory=True)
    (models / TINY_MLP).symlink_to(mlp_path)
    yield host
    (models / TINY_CLIP).unlink()
    (models / TINY_MLP).unlink()


def test_reward_nodes_list_suitable_files_after_the_published_model(reward_host):
    spec = lambda name: reward_host.nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
    pick, clipscore, aesthetic = (spec(n) for n in ("UniPic2PickScoreReward", "UniPic2CLIPScoreReward",
                                                    "UniPic2AestheticReward"))
    assert pick["model"][0][0] == PICKSCORE_REPO and pick["processor"][0][0] == PICKSCORE_PROCESSOR_REPO
    assert clipscore["model"][0][0] == aesthetic["clip"][0][0] == CLIP_L14_REPO
    assert aesthetic["mlp"][0] == [AESTHETIC_CHOICE, TINY_MLP]
    for choices in (pick["model"][0], pick["processor"][0], clipscore["model"][0], aesthetic["clip"][0]):
        assert TINY_CLIP in choices and "UniPic2-tiny-Kontext" not in choices


def test_reward_nodes_score_a_batch_under_model_patchers(reward_host, clip, mlp_path):
    from comfy.model_patcher import ModelPatcher

    images = pictures()
    made = {
        "pickscore": reward_host.node("UniPic2PickScoreReward").make(TINY_CLIP, TINY_CLIP, "fp32")[0],
        "clipscore": reward_host.node("UniPic2CLIPScoreReward").make(TINY_CLIP, "fp32")[0],
        "aesthetic": reward_host.node("UniPic2AestheticReward").make(TINY_CLIP, TINY_MLP, "fp32")[0],
    }
    expected = {"pickscore": pickscore(clip, images, PROMPTS), "clipscore": clip_score(clip, images, PROMPTS),
                "aesthetic": aesthetic_score(clip, load_aesthetic_mlp(mlp_path), images)}
    for name, reward in made.items():
        assert reward.names == [name] and TINY_CLIP in reward.fingerprint[0] and "fp32" in reward.fingerprint[0]
        assert torch.allclose(reward.score(images, PROMPTS, None)[name], expected[name], rtol=0, atol=1e-6)
    assert TINY_MLP in made["aesthetic"].fingerprint[0]
    nodes = reward_host.module("nodes.reward_nodes")
    (_, clip_patcher), = nodes._LOADED["pickscore"].values()
    (head, head_patcher), = nodes._LOADED["aesthetic-mlp"].values()
    assert isinstance(clip_patcher, ModelPatcher) and clip_patcher.model_size() > 0
    assert isinstance(head_patcher, ModelPatcher) and head_patcher.model.module is head
    again = reward_host.node("UniPic2PickScoreReward").make(TINY_CLIP, TINY_CLIP, "fp32")[0]
    assert nodes._LOADED["pickscore"][next(iter(nodes._LOADED["pickscore"]))][1] is clip_patcher  # cached
    assert torch.equal(again.score(images, PROMPTS, None)["pickscore"], made["pickscore"].score(
        images, PROMPTS, None)["pickscore"])


def test_a_partially_loaded_reward_model_scores_as_a_full_load(reward_host):
    from conftest import loaded_with_budget, offloaded_modules

    reward = reward_host.node("UniPic2PickScoreReward").make(TINY_CLIP, TINY_CLIP, "fp32")[0]
    images = pictures()
    full = reward.score(images, PROMPTS, None)["pickscore"]
    (clip_reward, patcher), = reward_host.module("nodes.reward_nodes")._LOADED["pickscore"].values()
    from unipic_core.rewards.reward_models import pickscore as engine_pickscore

    with loaded_with_budget(patcher, 0.3):
        assert offloaded_modules(patcher) > 0
        partial = engine_pickscore(clip_reward, images, PROMPTS)
    assert torch.allclose(partial, full, rtol=0, atol=1e-6)


def test_official_choices_download_only_what_the_reward_needs(reward_host, monkeypatch, clip_dir):
    import huggingface_hub

    fetched = {}

    def fake_snapshot_download(repo_id, local_dir, tqdm_class, allow_patterns):
        fetched[repo_id] = set(allow_patterns)
        shutil.copytree(clip_dir, local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    reward = reward_host.node("UniPic2PickScoreReward").make(PICKSCORE_REPO, PICKSCORE_PROCESSOR_REPO, "fp32")[0]
    assert reward.score(pictures(2), PROMPTS[:2], None)["pickscore"].shape == (2,)
    assert "model.safetensors" in fetched[PICKSCORE_REPO] and "pytorch_model.bin" not in fetched[PICKSCORE_REPO]
    assert not any("safetensors" in name for name in fetched[PICKSCORE_PROCESSOR_REPO])  # processor files only
    download_folder = Path(reward_host.module("nodes.host.folders").unipic2_download_folder())
    assert (download_folder / "PickScore_v1" / "model.safetensors").is_file()
    for name in ("PickScore_v1", "CLIP-ViT-H-14-laion2B-s32B-b79K"):
        shutil.rmtree(download_folder / name)
