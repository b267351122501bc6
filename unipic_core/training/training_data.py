"""Training data for GRPO: prompt lists and edit pairs (source image + instruction), and the check that a reward
can score every item."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..inference.images import check_image
from ..rewards import Reward
from ..rewards.object_reward import ObjectMetadata, parse_metadata

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainingItem:
    """One prompt, or one edit pair (source image [H, W, 3] in 0..1 + instruction); a prompt from a GenEval-style
    line carries its requirements (object_reward.ObjectMetadata) for the rewards that check them."""

    prompt: str
    source: torch.Tensor | None = None
    metadata: ObjectMetadata | None = None


def numbered_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of each non-empty line; lines starting with # are comments."""
    lines = ((n, line.strip()) for n, line in enumerate(text.splitlines(), start=1))
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments."""
    return [line for _, line in numbered_lines(text)]


def read_text(path: str | Path, what: str) -> str:
    """A UTF-8 text file; a missing or undecodable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} '{path}' does not exist or is not a file; give a text file, one line per entry")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at position {e.start}); "
                         "save it as UTF-8") from e


def read_text_lines(path: str | Path, what: str) -> list[str]:
    return prompt_lines(read_text(path, what))


def training_item(line: str, where: str) -> TrainingItem:
    """A plain prompt, or a GenEval-style JSON line (starting with '{'): its prompt, with its requirements."""
    if not line.startswith("{"):
        return TrainingItem(line)
    metadata = parse_metadata(line, where)
    return TrainingItem(metadata.prompt, metadata=metadata)


def read_prompts(text: str, file: str | Path | None = None) -> list[TrainingItem]:
    """Prompts from the text box and/or a UTF-8 text file, plain or GenEval-style lines mixed; an empty result is an
    error naming both inputs, a malformed GenEval line an error naming its line."""
    items = [training_item(line, f"'prompts' line {n}") for n, line in numbered_lines(text)]
    if file:
        items += [training_item(line, f"prompt file '{file}' line {n}")
                  for n, line in numbered_lines(read_text(file, "prompt file"))]
    if not items:
        raise ValueError("the prompt list is empty: write one prompt per line in 'prompts' or give a 'file'")
    return items


def read_image(path: Path) -> torch.Tensor:
    """One image file as [H, W, 3] float 0..1; an unreadable file is an error naming it."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except Exception as e:  # PIL raises several types for corrupt, truncated or oversized files
        raise ValueError(f"image '{path}' cannot be read ({e}); replace or remove it") from e
    return torch.from_numpy(pixels)


def read_folder_images(folder: str | Path, within: Path | None = None) -> list[torch.Tensor]:
    """Every image in a folder (sorted by name) as [H, W, 3] float 0..1.

    within: a folder no image may lead out of, links resolved (a ComfyUI server's input folder).
    An unreadable image is refused, not skipped: images pair with instructions by position, so a skip would
    silently pair every later image with the wrong instruction.
    """
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"image folder '{path}' does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder '{path}' holds no {'/'.join(IMAGE_SUFFIXES)} files")
    for file in files:
        if within is not None and Path(within).resolve() not in file.resolve().parents:
            raise ValueError(f"image '{file}' links to '{file.resolve()}', outside {within}; copy the image itself "
                             "into the folder")
    return [read_image(p) for p in files]


def edit_pairs(images: list[torch.Tensor], instructions: list[str]) -> list[TrainingItem]:
    """Pairs image i with instruction i; the counts must match."""
    if len(images) != len(instructions):
        raise ValueError(f"edit pairs: {len(images)} image(s) but {len(instructions)} instruction(s); give one "
                         "instruction per line for each image, in order")
    for i, image in enumerate(images):
        check_image(image[None], f"edit pairs: image {i + 1}")
    return [TrainingItem(text, image.float()) for image, text in zip(images, instructions)]


def check_reward_inputs(reward: Reward, data: list[TrainingItem]) -> None:
    """Refuses, before any training, a reward term that cannot score some item: prompts are drawn at random each
    step, so without this a mixed list would fail only when its first unfit item is drawn, possibly many steps in."""
    for term in reward.terms:
        for item in data:
            problem = term.refusal(item.prompt, item.source is not None, item.metadata is not None)
            if problem:
                raise ValueError(problem)
