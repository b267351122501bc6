"""Flow-GRPO maths (docs/architecture.md §6): SDE trajectories with log-probs, group advantages, the clipped loss;
Flow-GRPO-Fast's variant (stochastic CPS steps on a window, ODE elsewhere).

Everything here is float32 and free of ComfyUI, so the node and a torchrun script share it.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from ..inference.sampling import (cps_log_prob, cps_mean, cps_noise_scale, euler_step, flow_sde_mean, sde_noise_scale,
                                  step_log_prob)

ADVANTAGE_EPS = 1e-4
# flow-grpo: the paper's (SDE on every step, the first timestep_fraction of them trained); flow-grpo-fast: Flow-GRPO's
# fast variant (CPS steps on a window of steps, ODE elsewhere, only the window trained); diffusion-nft: DiffusionNFT
# (ODE samples of an old policy, trained on forward-process points of the clean samples: nft.py).
ALGORITHMS = ("flow-grpo", "flow-grpo-fast", "diffusion-nft")


@dataclass(frozen=True)
class StepRule:
    """How a stochastic step is taken and scored: mean_std(x, v, sigmas, i, a) -> (mean, std);
    log_prob(x_next, mean, std) -> [B]; kl_scale(sigmas, i, a): the s in the KL term's 1 / (2 s^2)."""

    mean_std: Callable
    log_prob: Callable
    kl_scale: Callable


SDE_STEP = StepRule(flow_sde_mean, step_log_prob, sde_noise_scale)  # Flow-GRPO
CPS_STEP = StepRule(cps_mean, cps_log_prob, cps_noise_scale)  # Flow-GRPO-Fast: its std doubles as the KL scale


def step_rule(algorithm: str) -> StepRule:
    """flow-grpo's SDE step, or the CPS step of flow-grpo-fast (diffusion-nft samples no stochastic step)."""
    return SDE_STEP if algorithm == "flow-grpo" else CPS_STEP


@dataclass
class Trajectory:
    """One batch of samples: latents [T + 1, B, C, H, W] (x at every sigma); the stochastic steps' indices and
    their log_probs [len(steps), B]. The other steps are deterministic (Euler; DPM-Solver++(2M) in nft.sample_clean)."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    steps: list[int]

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]

    def rows(self, rows: list[int]) -> "Trajectory":
        return Trajectory(self.latents[:, rows], self.log_probs[:, rows], self.steps)

    def log_prob(self, index: int) -> torch.Tensor:
        return self.log_probs[self.steps.index(index)]


@torch.no_grad()
def sample_trajectory(velocity_of, noise: torch.Tensor, sigmas: torch.Tensor, noise_level: float,
                      step_noise: torch.Tensor, rule: StepRule = SDE_STEP,
                      stochastic: list[int] | None = None) -> Trajectory:
    """Sample from pure noise along `sigmas`: the `stochastic` steps (all, the last included, when None) by `rule`
    with their log-probs, the others by Euler.

    velocity_of(x, sigma) -> v (a GuidedVelocity); noise [B, C, H, W]; step_noise [T, B, C, H, W].
    """
    steps = list(range(len(sigmas) - 1)) if stochastic is None else sorted(stochastic)
    x = noise.float()
    latents, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        velocity = velocity_of(x, sigmas[i].item())
        if i in steps:
            mean, std = rule.mean_std(x, velocity, sigmas, i, noise_level)
            x = mean + std * step_noise[i].to(x.device).float() if std else mean
            log_probs.append(rule.log_prob(x, mean, std))
        else:
            x = euler_step(x, velocity.float(), sigmas[i].item(), sigmas[i + 1].item())
        latents.append(x)
    return Trajectory(torch.stack(latents), torch.stack(log_probs), steps)


def step_policy(velocity_of, trajectory: Trajectory, sigmas: torch.Tensor, index: int, noise_level: float,
                rule: StepRule = SDE_STEP) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-evaluate stochastic step `index` of a stored trajectory under the current model: (log_prob [B], mean)."""
    x = trajectory.latents[index]
    mean, std = rule.mean_std(x, velocity_of(x, sigmas[index].item()), sigmas, index, noise_level)
    return rule.log_prob(trajectory.latents[index + 1], mean, std), mean


def sde_window(sampling_steps: int, window: int, generator: torch.Generator) -> list[int]:
    """Flow-GRPO-Fast's stochastic steps: `window` consecutive steps starting at random in the first half of the
    schedule (its repository: 3 steps starting at 0, 1 or 2 of 10)."""
    window = min(window, sampling_steps)
    last_start = max(sampling_steps // 2 - window, 0)
    start = int(torch.randint(last_start + 1, (1,), generator=generator))
    return list(range(start, start + window))


def trained_steps(sampling_steps: int, timestep_fraction: float) -> list[int]:
    """The step indices trained on: the first int(T * fraction) of the trajectory, at least one (Flow-GRPO)."""
    if not 0 < timestep_fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
    return list(range(max(1, int(sampling_steps * timestep_fraction))))


def group_advantages(rewards: torch.Tensor, group_size: int, batch_std: bool = False,
                     clip: float = 5.0) -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4), clipped to +-clip.

    rewards [N] ordered group by group (N = groups * group_size); the std is the group's, or the whole
    batch's with batch_std. A group whose rewards are all equal gets advantages of exactly 0.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    # Population std, as Flow-GRPO's np.std
    std = rewards.float().std(correction=0) if batch_std else groups.std(dim=1, keepdim=True, correction=0)
    return (centred / (std + ADVANTAGE_EPS)).clamp(-clip, clip).reshape(-1)


@dataclass
class LossTerms:
    loss: torch.Tensor
    policy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio: torch.Tensor


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              beta: float = 0.0, mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
              s_t: float = 1.0) -> LossTerms:
    """mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))) + beta * KL, rho = exp(log p - log p_old).

    KL = mean over C, H, W of (mu_theta - mu_ref)^2 / (2 s_t^2), averaged over the batch; s_t is the step's
    noise scale a * sqrt(sigma / (1 - sigma)).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    kl = torch.zeros((), device=log_prob.device)
    if beta > 0:
        kl = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))).mean() / (2 * s_t**2)
    clip_fraction = ((ratio - 1).abs() > clip_range).float().mean()
    return LossTerms(policy + beta * kl, policy.detach(), kl.detach(), clip_fraction.detach(), ratio.detach())

