"""Data-parallel training under torchrun: each rank samples a contiguous slice of a step's K * G images, the
rewards are all-gathered for the advantages and the LoRA gradients summed, so every rank's update equals one
process's with the same global batch. With one process (no process group) all of it is a no-op.
"""

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_scores(scores: dict[str, torch.Tensor], device: torch.device, world: int) -> dict[str, torch.Tensor]:
    """{name: this rank's scores [n]} -> {name: every rank's, in rank order [world * n]} on the CPU."""
    if world == 1:
        return scores
    gathered_scores = {}
    for name, value in scores.items():  # on the compute device: NCCL gathers no CPU tensors
        value = value.to(device)
        gathered = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(gathered, value)
        gathered_scores[name] = torch.cat(gathered).cpu()
    return gathered_scores


def sum_gradients(params: list[torch.Tensor], world: int) -> None:
    """Sum each parameter's gradient over the ranks (a rank without one contributes zeros)."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
