"""Rewards for GRPO: each scores a batch of images, one number per image, higher is better. This package's own
module holds the Reward type, combine and the rule-based rewards; the learned ones live beside it (reward_models:
PickScore, CLIPScore, the aesthetic predictor; editscore; object_reward).

A scoring function takes (images [N, H, W, 3] in 0..1, prompts: N strings, sources [N, H, W, 3] or None) and
returns a float32 tensor [N]. `sources` are the edit-pair source images (None for text-to-image). A term that
needs_metadata also gets each prompt's structured requirements (the GenEval-style lines of UniPic2 Prompt List) as a
fourth argument: N ObjectMetadata.
"""

import hashlib
import io
from dataclasses import dataclass
from typing import Callable

import torch

from ..inference.images import resize_image, to_pil

ScoreFn = Callable[[torch.Tensor, list[str], torch.Tensor | None], torch.Tensor]
MetadataScoreFn = Callable[[torch.Tensor, list[str], torch.Tensor | None, list], torch.Tensor]  # needs_metadata terms

# A GenEval-style prompt line, as error messages show it
METADATA_EXAMPLE = ('{"tag": "counting", "include": [{"class": "apple", "count": 3}], '
                    '"prompt": "a photo of three apples"}')
JPEG_QUALITY = 95  # Flow-GRPO's compressibility reward: file size in kB at this quality


@dataclass
class RewardTerm:
    name: str
    weight: float
    score: ScoreFn | MetadataScoreFn
    needs_sources: bool = False
    needs_metadata: bool = False
    detail: str = ""  # what the score depends on beyond its name (a colour target, a mask), for resume checks

    def refusal(self, prompt: str, has_source: bool, has_metadata: bool) -> str | None:
        """Why this term cannot score an image made for `prompt` (None when it can): it needs an edit pair's source,
        or a GenEval-style line's requirements."""
        if self.needs_sources and not has_source:
            return (f"the '{self.name}' reward compares with the source image, but '{prompt}' is a text-to-image "
                    "prompt; train on edit pairs (UniPic2 Edit Pairs) or remove the reward")
        if self.needs_metadata and not has_metadata and has_source:
            return (f"the '{self.name}' reward checks the objects a text-to-image prompt asks for, but this run trains "
                    f"edit pairs ('{prompt}'); remove the reward from edit runs")
        if self.needs_metadata and not has_metadata:
            return (f"the '{self.name}' reward checks the objects a prompt asks for, but '{prompt}' is a plain prompt; "
                    f"write GenEval-style lines in UniPic2 Prompt List, e.g. {METADATA_EXAMPLE}, or remove the reward")
        return None


@dataclass
class Reward:
    """UNIPIC2_REWARD: weighted terms; the training signal is sum(weight * score)."""

    terms: list[RewardTerm]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    @property
    def fingerprint(self) -> list[str]:
        """Each term as 'name x weight [detail]': what a resumed training run must find unchanged."""
        return [f"{t.name} x {t.weight:.10g}" + (f" [{t.detail}]" if t.detail else "") for t in self.terms]

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None,
              metadata: list | None = None) -> dict[str, torch.Tensor]:
        """{term name: scores [N]}; a term that needs sources or metadata fails clearly without them.

        metadata: per image, its prompt's ObjectMetadata or None (a plain prompt); only needs_metadata terms see it.
        """
        out, metadata = {}, metadata or [None] * len(prompts)
        for term in self.terms:
            for prompt, requirements in zip(prompts, metadata):
                problem = term.refusal(prompt, sources is not None, requirements is not None)
                if problem:
                    raise ValueError(problem)
            scores = term.score(images, prompts, sources, *([metadata] if term.needs_metadata else []))
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
            if scores.numel() != len(images):
                raise ValueError(f"reward '{term.name}' returned {scores.numel()} scores for {len(images)} images")
            out[term.name] = scores
        return out

    def total(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(t.weight * scores[t.name] for t in self.terms)


def combine(weighted: list[tuple[Reward, float]]) -> Reward:
    """One Reward from several, each scaled by its weight; names are made unique."""
    terms, seen = [], set()
    for reward, weight in weighted:
        for term in reward.terms:
            name, n = term.name, 2
            while name in seen:
                name, n = f"{term.name}_{n}", n + 1
            seen.add(name)
            terms.append(RewardTerm(name, term.weight * weight, term.score, term.needs_sources, term.needs_metadata,
                                     term.detail))
    return Reward(terms)


def jpeg_kilobytes(images: torch.Tensor) -> torch.Tensor:
    """Size of each image as a quality-95 JPEG, in kB."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_reward(incompressible: bool = False) -> Reward:
    """Compressibility (-kB, favours simple images) or incompressibility (+kB, favours detail), as Flow-GRPO."""
    sign = 1.0 if incompressible else -1.0
    name = "jpeg_incompressibility" if incompressible else "jpeg_compressibility"
    return Reward([RewardTerm(name, 1.0, lambda images, prompts, sources: sign * jpeg_kilobytes(images))])


def colour_reward(target: tuple[float, float, float]) -> Reward:
    """1 - mean |pixel - target| over pixels and channels: 1 when every pixel is the target colour.

    target (r, g, b) in 0..1; white (1, 1, 1) makes it a brightness reward (the score is the mean brightness).
    """
    colour = torch.tensor(target, dtype=torch.float32)
    if colour.numel() != 3 or not bool(((colour >= 0) & (colour <= 1)).all()):
        raise ValueError(f"target colour must be three values in 0..1, got {target}")

    def score(images, prompts, sources):
        return 1 - (images.float() - colour).abs().mean(dim=(1, 2, 3))

    name = "brightness" if bool((colour == 1).all()) else "colour"
    return Reward([RewardTerm(name, 1.0, score, detail="target ({:g}, {:g}, {:g})".format(*colour.tolist()))])


EDIT_METRICS = ("l1", "l2")


def edit_consistency_reward(metric: str = "l1", mask: torch.Tensor | None = None) -> Reward:
    """1 - distance to the source image over the pixels that should stay unchanged.

    mask [1, H, W] in 0..1 marks the region the edit may change (1 = free); it is resized to each image.
    metric: l1 (mean absolute difference) or l2 (mean squared difference).
    """
    if metric not in EDIT_METRICS:
        raise ValueError(f"metric must be one of {EDIT_METRICS}, got {metric!r}")
    if mask is not None and mask.shape[0] != 1:
        raise ValueError(f"mask: one mask for all edit pairs is supported, got a batch of {mask.shape[0]}")

    def score(images, prompts, sources):
        height, width = images.shape[1:3]
        sources = resize_image(sources, width, height)
        diff = (images.float() - sources.float()).abs()
        diff = diff if metric == "l1" else diff**2
        keep = torch.ones(images.shape[:3])
        if mask is not None:
            free = torch.nn.functional.interpolate(mask.float()[:, None], size=(height, width), mode="bilinear")
            keep = (1 - free[:, 0]).expand(len(images), -1, -1)
        kept = keep.sum(dim=(1, 2)).clamp(min=1) * 3
        return 1 - (diff * keep[..., None]).sum(dim=(1, 2, 3)) / kept

    detail = ""
    if mask is not None:
        detail = "mask sha256 " + hashlib.sha256(mask.float().cpu().numpy().tobytes()).hexdigest()[:12]
    return Reward([RewardTerm(f"edit_consistency_{metric}", 1.0, score, needs_sources=True, detail=detail)])


T2I_QUESTION = 'Does this image satisfy the description "{prompt}"? Answer yes or no.'
EDIT_QUESTION = ('The second image should be the first image edited by the instruction "{prompt}". '
                 "Does it follow the instruction? Answer yes or no.")


def judge_reward(probability_of_yes: Callable[[list[torch.Tensor], str], float]) -> Reward:
    """An MLLM judge: P("yes") that the image satisfies its prompt, or that the edit follows the instruction.

    probability_of_yes(images [H, W, 3] list, question) -> float; for editing the judge sees source then result.
    """

    def score(images, prompts, sources):
        scores = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            if sources is None:
                scores.append(probability_of_yes([image], T2I_QUESTION.format(prompt=prompt)))
            else:
                scores.append(probability_of_yes([sources[i], image], EDIT_QUESTION.format(prompt=prompt)))
        return torch.tensor(scores, dtype=torch.float32)

    return Reward([RewardTerm("judge", 1.0, score)])
