"""The rewards `grpo_torchrun --reward` names, each NAME or NAME=WEIGHT: the rule-based ones, and the learned ones
whose models are read from the --reward-models folder under their published names (as ComfyUI's models/unipic2
keeps them, so the nodes' downloads serve here too). A model missing there is downloaded into it from its published
repository first, by rank 0 alone (fetch_models; on several nodes the folder must be shared, or filled beforehand).
Outside ComfyUI the reward models simply stay on the training device, in float32 (the reward nodes' default);
EditScore's adapter is added to the MetaQuery's own MLLM while it scores, with the reward node's defaults (one pass,
seed 42)."""

import argparse
import math
from pathlib import Path

import torch

from ..models.folders import is_clip_folder, is_clip_processor_folder, is_owlv2_folder
from ..models.loading import download_file, download_repo
from ..models.metaquery import MetaQueryMLLM
from ..models.qwen25vl_lora import is_adapter_folder
from ..models.repos import (AESTHETIC_CHOICE, AESTHETIC_URL, CLIP_FILES, CLIP_L14_REPO, EDITSCORE_FILES,
                            EDITSCORE_REPO, OWLV2_FILES, OWLV2_REPO, PICKSCORE_PROCESSOR_REPO, PICKSCORE_REPO,
                            PROCESSOR_FILES, published_name)
from ..rewards import Reward, RewardTerm, colour_reward, combine, edit_consistency_reward, jpeg_reward

RULE_BASED = {
    "brightness": lambda: colour_reward((1.0, 1.0, 1.0)),
    "jpeg-compressibility": lambda: jpeg_reward(incompressible=False),
    "jpeg-incompressibility": lambda: jpeg_reward(incompressible=True),
    "edit-consistency": lambda: edit_consistency_reward("l1"),
}
# Each learned reward's published models: (hub repo or the aesthetic MLP's choice, the files to download, whether a
# path holds it whole -- so an interrupted download is resumed, not taken for the model)
CLIP_MODEL = (CLIP_L14_REPO, CLIP_FILES, is_clip_folder)
LEARNED = {
    "pickscore": [(PICKSCORE_REPO, CLIP_FILES, is_clip_folder),
                  (PICKSCORE_PROCESSOR_REPO, PROCESSOR_FILES, is_clip_processor_folder)],
    "clipscore": [CLIP_MODEL],
    "aesthetic": [CLIP_MODEL, (AESTHETIC_CHOICE, (), Path.is_file)],
    "objects": [(OWLV2_REPO, OWLV2_FILES, is_owlv2_folder)],
    "editscore": [(EDITSCORE_REPO, EDITSCORE_FILES, is_adapter_folder)],
}
CHOICES = (*RULE_BASED, *LEARNED)
EDITSCORE_NEEDS = ("the 'editscore' reward runs on the MetaQuery's Qwen2.5-VL-7B-Instruct; train a MetaQuery "
                   "--checkpoint, or use edit-consistency with a Kontext one")


def reward_choice(text: str) -> tuple[str, float]:
    """argparse type of one --reward entry: NAME or NAME=WEIGHT -> (name, weight)."""
    name, _, weight = text.partition("=")
    if name not in CHOICES:
        raise argparse.ArgumentTypeError(f"unknown reward '{name}'; choose from {', '.join(CHOICES)}")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}': the weight after '=' must be a finite number, e.g. {name}=0.5")
    return name, value


def check_choices(names: list[str], metaquery: bool) -> None:
    """Refuses, before anything loads or downloads, a reward the checkpoint cannot serve."""
    if "editscore" in names and not metaquery:
        raise ValueError(EDITSCORE_NEEDS)


def model_path(models_dir: Path, published: str) -> Path:
    """Where a published model lives in the models folder (a folder, or the MLP's file)."""
    return Path(models_dir) / published_name(published)


def fetch_models(names: list[str], models_dir: Path) -> None:
    """Download the named learned rewards' models that the models folder lacks or holds only in part."""
    for published, files, present in {model for name in names for model in LEARNED.get(name, [])}:
        path = model_path(models_dir, published)
        if present(path):
            continue
        if published == AESTHETIC_CHOICE:
            download_file(AESTHETIC_URL, path)
        else:
            download_repo(published, path, None, files)


def on_device(loaded, device: torch.device):
    """A loaded reward model (CLIPReward, OWLv2Detector) moved to `device`, where it then computes."""
    loaded.model.to(device)
    loaded.device = device
    return loaded


def learned_reward(name: str, models_dir: Path, device: torch.device, mllm: MetaQueryMLLM | None,
                   clips: dict[Path, object]) -> Reward:
    """One learned reward, its models loaded from the models folder onto `device` (EditScore's onto `mllm`); a CLIP
    already in `clips` (by folder) is shared, as clipscore and aesthetic read the same CLIP-L/14."""
    from ..rewards.reward_models import (aesthetic_score, check_aesthetic_pair, clip_score, load_aesthetic_mlp,
                                         load_clip_reward, pickscore)

    paths = [model_path(models_dir, published) for published, _, _ in LEARNED[name]]
    if name == "editscore":
        return editscore_reward(paths[0], mllm)
    detail = f"{', '.join(path.name for path in paths)}, fp32"
    if name == "objects":
        from ..rewards.object_reward import COUNTING_THRESHOLD, SCORE_THRESHOLD, load_owlv2, object_scores

        owl = on_device(load_owlv2(paths[0]), device)
        detail += f", thresholds {SCORE_THRESHOLD:g}/{COUNTING_THRESHOLD:g}"
        return Reward([RewardTerm(name, 1.0, lambda images, prompts, sources, metadata: object_scores(
            owl, images, metadata), needs_metadata=True, detail=detail)])
    if paths[0] not in clips:
        repo = LEARNED[name][0][0]
        processor, processor_repo = (paths[1], PICKSCORE_PROCESSOR_REPO) if name == "pickscore" else (None, None)
        clips[paths[0]] = on_device(load_clip_reward(paths[0], processor, torch.float32, repo, processor_repo), device)
    clip = clips[paths[0]]
    if name == "aesthetic":
        mlp = load_aesthetic_mlp(paths[1])
        check_aesthetic_pair(clip, mlp, paths[0].name, paths[1].name)
        mlp.to(device)
        score = lambda images, prompts, sources: aesthetic_score(clip, mlp, images)
    else:
        measure = pickscore if name == "pickscore" else clip_score
        score = lambda images, prompts, sources: measure(clip, images, prompts)
    return Reward([RewardTerm(name, 1.0, score, detail=detail)])


def editscore_reward(adapter: Path, mllm: MetaQueryMLLM | None) -> Reward:
    """EditScore with the adapter folder's LoRA added to `mllm` (the MetaQuery's) only while it scores."""
    from ..models.qwen25vl import MissingOutputLayer
    from ..models.qwen25vl_lora import lora_added, read_qwen25vl_lora
    from ..rewards.editscore import SEED, editscore

    if mllm is None:
        raise ValueError(EDITSCORE_NEEDS)
    if isinstance(mllm.mllm.lm_head, MissingOutputLayer):
        raise ValueError(f"the 'editscore' reward answers in words, but the MLLM from {mllm.mllm.lm_head.path.name} "
                         "has no output layer (lm_head); give --mllm the Qwen2.5-VL-7B-Instruct folder")
    lora = read_qwen25vl_lora(adapter, mllm.mllm, EDITSCORE_REPO)

    def score(images, prompts, sources):
        with lora_added(mllm.mllm, lora):
            return editscore(mllm, sources, images, prompts).rewards

    detail = f"{adapter.name}, 1 pass(es), seed {SEED}"
    return Reward([RewardTerm("editscore", 1.0, score, needs_sources=True, detail=detail)])


def build_reward(choices: list[tuple[str, float]], models_dir: Path, device: torch.device,
                 mllm: MetaQueryMLLM | None = None) -> Reward:
    """The weighted sum of the chosen rewards; the learned ones' models must be in the models folder, and EditScore
    needs the MetaQuery's MLLM."""
    clips = {}
    return combine([(RULE_BASED[name]() if name in RULE_BASED
                     else learned_reward(name, models_dir, device, mllm, clips), weight) for name, weight in choices])
