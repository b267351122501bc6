"""What one training step makes and who makes it: the prompts it draws, the image sizes, the random generators, the
chunks of images each process samples and the parts its update is split into.

Randomness is a pure function of (seed, step, image index): prompt choice, initial noise and SDE noise. A resumed
run therefore needs only the step number to continue exactly where it stopped, and an image is the same whatever
the number of processes.
"""

import hashlib
from dataclasses import dataclass

import torch

from ..inference.images import longer_edge_size
from .grpo import Trajectory, sde_window
from .grpo_settings import SIZE_MULTIPLE, GRPOSettings
from .training_data import TrainingItem


def step_generator(seed: int, step: int, index: int = -1, purpose: str = "") -> torch.Generator:
    """A CPU generator that depends only on (seed, step, image index, purpose); index -1 is the step's prompt
    choice, -2 flow-grpo-fast's window; purpose "nft" an image's training points."""
    digest = hashlib.sha256(f"{seed}/{step}/{index}{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def choose_items(data: list[TrainingItem], settings: GRPOSettings, step: int) -> list[TrainingItem]:
    order = torch.randperm(len(data), generator=step_generator(settings.seed, step))
    picks = [order[i % len(data)].item() for i in range(settings.prompts_per_step)]
    return [data[i] for i in picks]


def target_size(item: TrainingItem, resolution: int) -> tuple[int, int]:
    """(width, height): resolution^2 for text-to-image; the source's aspect at that longer edge for editing."""
    if item.source is None:
        return resolution, resolution
    height, width = item.source.shape[:2]
    return longer_edge_size(width, height, resolution, SIZE_MULTIPLE)


def stochastic_steps(settings: GRPOSettings, step: int) -> list[int] | None:
    """The step's stochastic sampler steps: all (None) for flow-grpo; a window drawn per step (the same on every
    rank, and again on resume) for flow-grpo-fast; none for diffusion-nft (ODE samples)."""
    if settings.algorithm == "flow-grpo":
        return None
    if settings.algorithm == "diffusion-nft":
        return []
    return sde_window(settings.sampling_steps, settings.sde_window, step_generator(settings.seed, step, -2))


@dataclass
class Chunk:
    """Images of one group that go through the DiT together (same prompt, same size)."""

    group: int
    indices: list[int]  # global image indices
    trajectory: Trajectory | None = None
    images: torch.Tensor | None = None


def plan_chunks(settings: GRPOSettings, rank: int, world: int) -> list[Chunk]:
    """This rank's contiguous slice of the step's K * G images, in chunks of at most micro_batch images."""
    total = settings.prompts_per_step * settings.group_size
    if total % world:
        raise ValueError(f"prompts_per_step * group_size = {total} images do not split over {world} processes")
    per_rank = total // world
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    micro = settings.micro_batch or settings.group_size
    chunks: list[Chunk] = []
    for index in mine:
        group = index // settings.group_size
        if chunks and chunks[-1].group == group and len(chunks[-1].indices) < micro:
            chunks[-1].indices.append(index)
        else:
            chunks.append(Chunk(group, [index]))
    return chunks


def update_parts(chunks: list[Chunk], valid: torch.Tensor,
                 updates: int) -> list[tuple[int, list[tuple[Chunk, list[int]]]]]:
    """The step's images split into `updates` parts, one optimizer step each: per part, its trainable images over
    all ranks and this rank's share as (chunk, rows) pieces. valid [K * G]: False for a skipped (NaN) group's images.

    Parts are ranges of *global* image indices, so every rank takes part in every update and the updates are
    the same whatever the number of processes.
    """
    part_of = torch.arange(len(valid)) * updates // len(valid)
    parts: list[list[tuple[Chunk, list[int]]]] = [[] for _ in range(updates)]
    for chunk in chunks:
        if not bool(valid[chunk.indices].all()):
            continue  # a skipped (NaN) group: no gradient from it
        for row, index in enumerate(chunk.indices):
            part = parts[part_of[index]]
            if part and part[-1][0] is chunk:
                part[-1][1].append(row)
            else:
                part.append((chunk, [row]))
    return [(int((valid & (part_of == u)).sum().item()), part) for u, part in enumerate(parts)]
