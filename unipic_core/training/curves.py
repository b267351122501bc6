"""Training pictures for the trainer node's IMAGE outputs: reward / loss curves and a grid of samples (PIL only)."""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: dict[str, list[float]]) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(180, 180, 180))
    values = [v for points in series.values() for v in points if math.isfinite(v)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    draw.text((left + 6, top + 4), f"{title}   [{low:.4g} .. {high:.4g}]", fill=(0, 0, 0))
    inner_top, inner_bottom = top + 20, bottom - 6
    for n, (name, points) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        draw.text((right - 150, top + 4 + 12 * n), name, fill=colour)
        runs: list[list[tuple[float, float]]] = [[]]
        for i, v in enumerate(points):
            if not math.isfinite(v):  # a gap: no value at this step (term absent, or its groups skipped)
                runs.append([])
                continue
            x = left + 6 + (right - left - 12) * (i / max(len(points) - 1, 1))
            y = inner_bottom - (inner_bottom - inner_top) * (v - low) / (high - low)
            runs[-1].append((x, y))
        for xy in runs:
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for x, y in xy:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


def plot_curves(history: list[dict], width: int = 768, height: int = 512) -> torch.Tensor:
    """IMAGE [1, height, width, 3]: mean reward per term (top) and loss / KL (bottom) per training step.

    The reward terms are those of any step, in first-seen order (a run resumed under a changed reward, from a state
    older than the resume checks, has both); a step without a term leaves a gap in its curve.
    """
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    names = list(dict.fromkeys(name for h in history for name in h["rewards"]))
    rewards = {name: [h["rewards"].get(name, (math.nan, math.nan))[0] for h in history] for name in names}
    losses = {"loss": [h["loss"] for h in history], "kl": [h["kl"] for h in history]}
    _panel(draw, (4, 4, width - 5, height // 2 - 3), "reward (mean per step)", rewards)
    _panel(draw, (4, height // 2 + 2, width - 5, height - 5), "loss / KL", losses)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None]


def sample_grid(images: torch.Tensor, columns: int = 4) -> torch.Tensor:
    """IMAGE [N, H, W, 3] -> IMAGE [1, rows * H, columns * W, 3], unused cells black."""
    count, height, width, _ = images.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = torch.zeros(rows * height, columns * width, 3)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return grid[None]
