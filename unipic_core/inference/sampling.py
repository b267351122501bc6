"""Flow-matching sampling for the Kontext DiT: Euler ODE, DPM-Solver++(2M) and the Flow-GRPO SDE step, with CFG.

Conventions (docs/architecture.md §5): x_sigma = (1 - sigma) * x0 + sigma * noise, the DiT predicts v = noise - x0
and is fed timestep = sigma * 1000. Latents here are in *model space*, (raw_vae_latent - shift) * scale.
All step maths runs in float32 whatever the DiT's dtype; low precision gives NaN log-probs in training.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

SAMPLERS = ("euler", "flow-sde")


@dataclass
class PromptEmbeds:
    """One side of classifier-free guidance: tokens [B, L, D_joint] and pooled [B, D_pooled]."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def expand_to(self, batch: int) -> "PromptEmbeds":
        if self.tokens.shape[0] == batch:
            return self
        if self.tokens.shape[0] != 1:
            raise ValueError(f"conditioning batch {self.tokens.shape[0]} does not match latent batch {batch}")
        return PromptEmbeds(self.tokens.expand(batch, -1, -1), self.pooled.expand(batch, -1))


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


def dpm_solver_2m_step(x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor | None, sigmas: torch.Tensor,
                       index: int) -> torch.Tensor:
    """DPM-Solver++(2M)'s deterministic step from sigmas[index] to sigmas[index + 1] (Lu et al. 2022, data prediction,
    alpha = 1 - sigma): x0 is this step's clean estimate x - sigma v, previous_x0 the step before's (None at the first).

    First order (DDIM without noise, i.e. Euler) at the first step, which has no earlier estimate, and at the last,
    to sigma 0 where lambda is infinite, on every schedule as DiffusionNFT's solver. A previous sigma of 1 has
    lambda = -inf, so the correction vanishes at the step after it too.
    """
    s = sigmas.double()
    if previous_x0 is None or index == len(sigmas) - 2:
        return euler_step(x, (x - x0) / s[index].item(), s[index].item(), s[index + 1].item())
    lam = torch.log(1 - s[index - 1:index + 2]) - torch.log(s[index - 1:index + 2])  # lambda = log(alpha / sigma)
    h, h_previous = lam[2] - lam[1], lam[1] - lam[0]
    correction = (h / h_previous).item() * (x0 - previous_x0)  # D1 = (m0 - m1) / r0
    sigma, sigma_next = s[index].item(), s[index + 1].item()
    return sigma_next / sigma * x - (1 - sigma_next) * torch.expm1(-h).item() * (x0 + 0.5 * correction)


def sde_noise_scale(sigmas: torch.Tensor, index: int, noise_level: float) -> float:
    """s_t = a * sqrt(sigma / (1 - sigma)); at sigma = 1 the next sigma stands in for the denominator."""
    sigma = sigmas[index].item()
    denominator_sigma = sigmas[1].item() if sigma == 1.0 else sigma
    return noise_level * math.sqrt(sigma / (1 - denominator_sigma))


def flow_sde_mean(
    x: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int, noise_level: float,
) -> tuple[torch.Tensor, float]:
    """Mean and std of the Flow-GRPO SDE step from sigmas[index] to sigmas[index + 1] (float32).

    mean = x + [v + (s_t^2 / (2 sigma)) (x + (1 - sigma) v)] dt and std = s_t sqrt(-dt); with noise_level 0
    the mean is the Euler step and std is 0.
    """
    x, velocity = x.float(), velocity.float()
    sigma, sigma_next = sigmas[index].item(), sigmas[index + 1].item()
    dt = sigma_next - sigma
    s_t = sde_noise_scale(sigmas, index, noise_level)
    mean = x + (velocity + (s_t**2 / (2 * sigma)) * (x + (1 - sigma) * velocity)) * dt
    return mean, s_t * math.sqrt(-dt)


def flow_sde_step(
    x: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int, noise_level: float,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One Flow-GRPO SDE step: (x_next, mean, std) with x_next = mean + std * noise (float32)."""
    mean, std = flow_sde_mean(x, velocity, sigmas, index, noise_level)
    if std == 0.0:
        return mean, mean, std
    if noise is None:
        raise ValueError("flow_sde_step needs noise when noise_level > 0")
    return mean + std * noise.float(), mean, std


def cps_noise_scale(sigmas: torch.Tensor, index: int, noise_level: float) -> float:
    """The CPS step's std s = sigma' sin(a pi / 2) (Flow-GRPO-Fast's KL scale too)."""
    return sigmas[index + 1].item() * math.sin(noise_level * math.pi / 2)


def cps_mean(
    x: torch.Tensor, velocity: torch.Tensor, sigmas: torch.Tensor, index: int, noise_level: float,
) -> tuple[torch.Tensor, float]:
    """Mean and std of Flow-GRPO-Fast's coefficients-preserving step (CPS) from sigmas[index] to sigmas[index + 1].

    With the clean and noise estimates x0 = x - sigma v and x1 = x + (1 - sigma) v, the next point keeps
    (1 - sigma') x0 and splits the sigma' noise share between x1 and fresh noise: std s = sigma' sin(a pi / 2),
    mean = (1 - sigma') x0 + sqrt(sigma'^2 - s^2) x1. With noise_level 0 this is the Euler step.
    """
    x, velocity = x.float(), velocity.float()
    sigma, sigma_next = sigmas[index].item(), sigmas[index + 1].item()
    std = cps_noise_scale(sigmas, index, noise_level)
    x0, x1 = x - sigma * velocity, x + (1 - sigma) * velocity
    return (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - std**2) * x1, std


def cps_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Flow-GRPO-Fast's score of a CPS step: minus the mean squared distance to the mean over C, H, W -> [B], i.e.
    a Gaussian log-density without its 1 / (2 std^2) and constant, as in its repository (whose clip range is set
    for this scale)."""
    return -((x_next.float() - mean) ** 2).mean(dim=tuple(range(1, x_next.ndim)))


def step_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Gaussian log-density of x_next under N(mean, std^2), averaged over C, H, W -> [B] (float32)."""
    log_density = -((x_next.float() - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


class GuidedVelocity:
    """v(x, sigma) with classifier-free guidance: v_neg + g * (v_pos - v_neg).

    Negative and positive run batched in one forward when their token lengths match (two forwards otherwise);
    the reference latent is shared by both halves. Conditioning is cast to the DiT's device and dtype once, here.
    positive/negative: PromptEmbeds of batch 1 or `batch`; reference: [1 or batch, C, H, W] model-space or None.
    """

    def __init__(self, dit, positive: PromptEmbeds, negative: PromptEmbeds | None, guidance: float,
                 reference: torch.Tensor | None, batch: int, device: torch.device):
        self.dit, self.guidance = dit, guidance
        sides = [positive] if negative is None or guidance == 1.0 else [negative, positive]
        sides = [side.expand_to(batch) for side in sides]
        self.batched = len(sides) == 2 and sides[0].tokens.shape[1] == sides[1].tokens.shape[1]
        if self.batched:
            sides = [PromptEmbeds(torch.cat([s.tokens for s in sides]), torch.cat([s.pooled for s in sides]))]
        cast = (lambda t: t.to(device, dit.dtype))
        copies = len(sides[0].tokens) // batch  # 2 when negative and positive share one forward
        ref = None if reference is None else cast(reference.expand(batch, -1, -1, -1)).repeat(copies, 1, 1, 1)
        self.passes = [(cast(side.tokens), cast(side.pooled), ref) for side in sides]

    def _forward(self, x: torch.Tensor, sigma: float | torch.Tensor, tokens, pooled, ref) -> torch.Tensor:
        copies = len(tokens) // len(x)
        x_in = x.to(tokens.dtype).repeat(copies, 1, 1, 1)
        if isinstance(sigma, torch.Tensor):  # one sigma per sample, times 1000 in double as for a float sigma
            timestep = (sigma.double() * 1000).float().to(x.device).repeat(copies)
        else:
            timestep = torch.full((len(x_in),), sigma * 1000, device=x.device, dtype=torch.float32)
        return self.dit(x_in, timestep, tokens, pooled, ref).float()

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] model-space latent, sigma a float or one per sample [B] -> velocity [B, C, H, W]
        (float32)."""
        outputs = [self._forward(x, sigma, *p) for p in self.passes]
        if self.batched:
            outputs = outputs[0].chunk(2)
        if len(outputs) == 1:
            return outputs[0]
        return guide(outputs[0], outputs[1], self.guidance)


def guide(v_neg: torch.Tensor, v_pos: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_neg + g * (v_pos - v_neg)."""
    # The unconditional branch carries no gradient in GRPO training (docs/architecture.md §6); at inference
    # nothing is tracked, so the detach costs nothing there.
    v_neg = v_neg.detach()
    return v_neg + guidance * (v_pos - v_neg)


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample(
    dit, noise: torch.Tensor, sigmas: torch.Tensor, positive: PromptEmbeds,
    negative: PromptEmbeds | None = None, guidance: float = 3.5, reference: torch.Tensor | None = None,
    sampler: str = "euler", noise_level: float = 0.7, generator: torch.Generator | None = None,
    start_latent: torch.Tensor | None = None, on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from `noise` along `sigmas` with `dit` (a dit.TrainableDiT) and return the model-space latent (float32).

    The host-free reference loop (benchmarks, scripts, parity tests); in ComfyUI, UniPic2 Sampler runs the native
    model through ComfyUI's sampling instead. noise: [B, C, H, W]; start_latent: model-space latent to noise to
    sigmas[0] (img2img), or None to start from pure noise; generator: CPU generator for the flow-sde step noise
    (reproducible across devices); on_step(i, total, x, x0_estimate) runs after every step -- progress, previews and Cancel live there.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    x = noise.float()
    velocity_of = GuidedVelocity(dit, positive, negative, guidance, reference, x.shape[0], x.device)
    if start_latent is not None:
        x = sigmas[0].item() * x + (1 - sigmas[0].item()) * start_latent.float()
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        velocity = velocity_of(x, sigma)
        x_prev = x
        if sampler == "euler" or sigma_next == 0.0:
            # flow-sde's last step (to sigma = 0) is Euler so no SDE noise is left in the image; the GRPO
            # trainer, which needs a log-prob for every step, takes the SDE step there too.
            x = euler_step(x, velocity, sigma, sigma_next)
        else:
            step_noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x, _, _ = flow_sde_step(x, velocity, sigmas, i, noise_level, step_noise)
        if on_step is not None:
            on_step(i, total, x, x_prev - sigma * velocity)
    return x
