"""Flow-GRPO maths (DESIGN.md section 5): SDE trajectories with log-probs, group advantages, the clipped loss.

Everything here is float32 and free of ComfyUI, so the node and a torchrun script share it.
"""

from dataclasses import dataclass

import torch

from .sampling import flow_sde_mean, flow_sde_step, step_log_prob

ADVANTAGE_EPS = 1e-4


@dataclass
class Trajectory:
    """One batch of SDE samples: latents [T + 1, B, C, H, W] (x at every sigma) and log_probs [T, B]."""

    latents: torch.Tensor
    log_probs: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def sample_trajectory(velocity_of, noise: torch.Tensor, sigmas: torch.Tensor, noise_level: float,
                      step_noise: torch.Tensor) -> Trajectory:
    """SDE-sample from pure noise along `sigmas`, every step (the last included) stochastic.

    velocity_of(x, sigma) -> v (a GuidedVelocity); noise [B, C, H, W]; step_noise [T, B, C, H, W].
    """
    x = noise.float()
    latents, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        x, mean, std = flow_sde_step(x, velocity_of(x, sigmas[i].item()), sigmas, i, noise_level,
                                     step_noise[i].to(x.device))
        latents.append(x)
        log_probs.append(step_log_prob(x, mean, std))
    return Trajectory(torch.stack(latents), torch.stack(log_probs))


def step_policy(velocity_of, trajectory: Trajectory, sigmas: torch.Tensor, index: int,
                noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-evaluate step `index` of a stored trajectory under the current model: (log_prob [B], mean)."""
    x = trajectory.latents[index]
    mean, std = flow_sde_mean(x, velocity_of(x, sigmas[index].item()), sigmas, index, noise_level)
    return step_log_prob(trajectory.latents[index + 1], mean, std), mean


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

