"""Training data for GRPO: prompt lists and edit pairs (source image + instruction)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .grpo_training import TrainingItem
from .images import check_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def prompt_lines(text: str) -> list[str]:
    """One prompt per non-empty line; lines starting with # are comments."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_prompts(text: str, file: str = "") -> list[TrainingItem]:
    """Prompts from the text box and/or a UTF-8 text file; an empty result is an error naming both inputs."""
    lines = prompt_lines(text)
    if file.strip():
        path = Path(file.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"prompt file '{path}' does not exist; give the full path of a text file, one prompt "
                             "per line")
        lines += prompt_lines(path.read_text(encoding="utf-8"))
    if not lines:
        raise ValueError("the prompt list is empty: write one prompt per line in 'prompts' or give a 'file'")
    return [TrainingItem(line) for line in lines]


def read_folder_images(folder: str) -> list[torch.Tensor]:
    """Every image in a folder (sorted by name) as [H, W, 3] float 0..1."""
    path = Path(folder.strip()).expanduser()
    if not path.is_dir():
        raise ValueError(f"image folder '{path}' does not exist")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder '{path}' holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255) for p in files]


def edit_pairs(images: list[torch.Tensor], instructions: list[str]) -> list[TrainingItem]:
    """Pairs image i with instruction i; the counts must match."""
    if len(images) != len(instructions):
        raise ValueError(f"edit pairs: {len(images)} image(s) but {len(instructions)} instruction(s); give one "
                         "instruction per line for each image, in order")
    for i, image in enumerate(images):
        check_image(image[None], f"edit pairs: image {i + 1}")
    return [TrainingItem(text, image.float()) for image, text in zip(images, instructions)]
