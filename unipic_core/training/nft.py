"""DiffusionNFT maths (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process"): the loss
on forward-process points of clean samples, the optimality probability from advantages, and the old policy: its
decay, and swapping it into the DiT's adapter. Float32, free of ComfyUI.

The samples come from the "old" policy (a slowly following copy of the LoRA) by a deterministic sampler without CFG,
DPM-Solver++(2M) (the repository's "dpm2"). Training noises each clean sample x0 to x_t = (1 - t) x0 + t eps at the
sampler's timesteps and pulls an implicit positive policy v+ = b v_theta + (1 - b) v_old toward x0 for good samples
and an implicit negative policy v- = (1 + b) v_old - b v_theta for bad ones, each in x0 space with a per-sample
adaptive weight.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..inference.sampling import dpm_solver_2m_step
from ..models.dit import TrainableDiT
from .grpo import Trajectory

MIN_WEIGHT = 1e-5


@dataclass
class NFTTerms:
    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def optimality(advantages: torch.Tensor, advantage_clip: float) -> torch.Tensor:
    """r in [0, 1] per sample: how much of the positive policy's loss it takes (1 - r goes to the negative).
    Advantages clipped to +-advantage_clip map onto [0, 1]: r = A / (2 clip) + 1 / 2."""
    return (advantages / (2 * advantage_clip) + 0.5).clamp(0, 1)


def forward_point(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, t [B] per sample."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def adaptive_x0_loss(x0_estimate: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared x0 error over C, H, W divided by its (gradient-free) mean absolute error [B]."""
    dims = tuple(range(1, x0.ndim))
    weight = (x0_estimate - x0).abs().mean(dim=dims).detach().clamp(min=MIN_WEIGHT)
    return ((x0_estimate - x0) ** 2).mean(dim=dims) / weight


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, advantage_clip: float, kl_weight: float = 0.0,
             v_ref: torch.Tensor | None = None) -> NFTTerms:
    """clip * mean[(r L+ + (1 - r) L-) / beta] + kl_weight * mean[mean over C, H, W of (v_theta - v_ref)^2], clip
    being the advantage clip (5: the repository scales the policy term by it).

    L+- is adaptive_x0_loss of x_t - t v+- with v+ = beta v_theta + (1 - beta) v_old, v- = (1 + beta) v_old -
    beta v_theta; v_old and v_ref carry no gradient.
    """
    v_theta, v_old = v_theta.float(), v_old.detach().float()
    t_ = t.view(-1, *([1] * (x0.ndim - 1)))
    positive = adaptive_x0_loss(x_t - t_ * (beta * v_theta + (1 - beta) * v_old), x0)
    negative = adaptive_x0_loss(x_t - t_ * ((1 + beta) * v_old - beta * v_theta), x0)
    policy = advantage_clip * ((r * positive + (1 - r) * negative) / beta).mean()
    kl = torch.zeros((), device=v_theta.device)
    if kl_weight > 0:
        kl = ((v_theta - v_ref.detach().float()) ** 2).mean(dim=tuple(range(1, x0.ndim))).mean()
    return NFTTerms(policy + kl_weight * kl, policy.detach(), kl.detach(), torch.zeros((), device=v_theta.device))


@torch.no_grad()
def sample_clean(velocity_of, noise: torch.Tensor, sigmas: torch.Tensor) -> Trajectory:
    """Deterministic samples from pure noise along `sigmas` by DPM-Solver++(2M): a Trajectory without stochastic
    steps, whose final latents are the clean samples x0 that training noises again."""
    x, previous_x0 = noise.float(), None
    latents = [x]
    for i in range(len(sigmas) - 1):
        x0 = x - sigmas[i].item() * velocity_of(x, sigmas[i].item()).float()
        x, previous_x0 = dpm_solver_2m_step(x, x0, previous_x0, sigmas, i), x0
        latents.append(x)
    return Trajectory(torch.stack(latents), x.new_zeros(0, len(x)), [])


def old_policy_decay(optimizer_steps: int) -> float:
    """How much of the old policy it keeps at an update (the repository's default schedule): min(0.001 n, 0.5)."""
    return min(0.001 * optimizer_steps, 0.5)


@torch.no_grad()
def follow(old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> dict[str, torch.Tensor]:
    """old <- decay * old + (1 - decay) * current, tensor by tensor."""
    return {name: decay * old[name] + (1 - decay) * current[name].detach().to(old[name]) for name in old}


@contextmanager
def old_policy(dit: TrainableDiT, old_adapter: dict[str, torch.Tensor] | None):
    """Inside the block the DiT's adapter holds the old policy's values, the LoRA's again after it; without an old
    policy (the GRPO algorithms) the adapter is left alone."""
    if old_adapter is None:
        yield
        return
    live = dit.adapter_parameters()
    current = {name: p.detach().clone() for name, p in live.items()}
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(old_adapter[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in live.items():
                p.copy_(current[name])
