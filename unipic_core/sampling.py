"""Flow-matching sampling for the Kontext DiT: Euler ODE and the Flow-GRPO SDE step, with CFG.

Conventions (DESIGN.md section 4): x_sigma = (1 - sigma) * x0 + sigma * noise, the DiT predicts v = noise - x0
and is fed timestep = sigma * 1000. Latents here are in *model space*, (raw_vae_latent - shift) * scale.
All step maths runs in float32 whatever the DiT's dtype; low precision gives NaN log-probs in training.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

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


@dataclass
class TimedPrompt:
    """One conditioning entry of a prompt schedule (ComfyUI's timestep ranges and strength).

    Active while sigma_end <= sigma <= sigma_start (both ends included, as ComfyUI's get_area_and_mult); when
    several entries of one side are active, their velocities are averaged weighted by strength.
    """

    embeds: PromptEmbeds
    sigma_start: float = 1.0
    sigma_end: float = 0.0
    strength: float = 1.0

    def active_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


Prompt = PromptEmbeds | list[TimedPrompt]  # one prompt for every step, or a schedule of several


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * velocity


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

    def _forward(self, x: torch.Tensor, sigma: float, tokens, pooled, ref) -> torch.Tensor:
        x_in = x.to(tokens.dtype).repeat(len(tokens) // len(x), 1, 1, 1)
        timestep = torch.full((len(x_in),), sigma * 1000, device=x.device, dtype=torch.float32)
        return self.dit(x_in, timestep, tokens, pooled, ref).float()

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: [B, C, H, W] model-space latent -> velocity [B, C, H, W] (float32)."""
        outputs = [self._forward(x, sigma, *p) for p in self.passes]
        if self.batched:
            outputs = outputs[0].chunk(2)
        if len(outputs) == 1:
            return outputs[0]
        return guide(outputs[0], outputs[1], self.guidance)


def guide(v_neg: torch.Tensor, v_pos: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance v_neg + g * (v_pos - v_neg)."""
    # The unconditional branch carries no gradient in GRPO training (DESIGN.md section 5); at inference
    # nothing is tracked, so the detach costs nothing there.
    v_neg = v_neg.detach()
    return v_neg + guidance * (v_pos - v_neg)


class ScheduledVelocity:
    """Classifier-free guidance over prompt schedules (several conditioning entries with timestep ranges).

    Each side's velocity at sigma is the strength-weighted mean of the velocities of its entries active at sigma
    (ComfyUI's rule in calc_cond_batch), one forward per active entry. Same arguments as GuidedVelocity.
    """

    def __init__(self, transformer, positive: Prompt, negative: Prompt | None, guidance: float,
                 reference: torch.Tensor | None, batch: int, device: torch.device):
        def entries(prompt: Prompt) -> list[tuple[TimedPrompt, GuidedVelocity]]:
            timed = [TimedPrompt(prompt)] if isinstance(prompt, PromptEmbeds) else prompt
            return [(e, GuidedVelocity(transformer, e.embeds, None, 1.0, reference, batch, device)) for e in timed]

        self.guidance = guidance
        self.positive = entries(positive)
        self.negative = None if negative is None or guidance == 1.0 else entries(negative)

    @staticmethod
    def _mean_velocity(side, x: torch.Tensor, sigma: float) -> torch.Tensor:
        active = [(entry.strength, velocity_of) for entry, velocity_of in side if entry.active_at(sigma)]
        if not active:
            raise ValueError(f"no conditioning entry is active at sigma {sigma:.4f}; the timestep ranges must "
                             "cover the whole schedule")
        return sum(strength * velocity_of(x, sigma) for strength, velocity_of in active) / sum(s for s, _ in active)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        v_pos = self._mean_velocity(self.positive, x, sigma)
        if self.negative is None:
            return v_pos
        return guide(self._mean_velocity(self.negative, x, sigma), v_pos, self.guidance)


def guided_velocity(transformer, positive: Prompt, negative: Prompt | None, guidance: float,
                    reference: torch.Tensor | None, batch: int, device: torch.device):
    """GuidedVelocity for one prompt per side (batched CFG), ScheduledVelocity when either side is a schedule."""
    if isinstance(positive, PromptEmbeds) and (negative is None or isinstance(negative, PromptEmbeds)):
        return GuidedVelocity(transformer, positive, negative, guidance, reference, batch, device)
    return ScheduledVelocity(transformer, positive, negative, guidance, reference, batch, device)


def resize_noise_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A LATENT's noise_mask ([h, w], [B, h, w] or [B, 1, h, w]; 1 = regenerate, 0 = keep) -> [B, 1, height, width].

    Bilinear, as ComfyUI's prepare_mask (comfy.utils.reshape_mask) sizes it to the latent; float32.
    """
    mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return F.interpolate(mask, size=(height, width), mode="bilinear")


class InpaintVelocity:
    """ComfyUI's noise-mask inpainting (comfy.samplers.KSamplerX0Inpaint) for a velocity model.

    Where the mask is 0 the model sees the original latent noised to the current sigma with the sampler's own
    noise, (1 - sigma) * x0 + sigma * noise, and its clean estimate there is replaced by x0; the returned velocity
    is (x - estimate) / sigma, so the sampler lands on x0 in the kept region at sigma = 0. A soft mask blends.
    mask: [1 or B, 1, H, W] in 0..1; latent (x0) and noise: [B, C, H, W] model space.
    """

    def __init__(self, velocity_of, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor):
        self.velocity_of, self.mask, self.latent, self.noise = velocity_of, mask, latent, noise

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        keep = 1 - self.mask
        x_in = x * self.mask + ((1 - sigma) * self.latent + sigma * self.noise) * keep
        # (x - [mask * (x_in - sigma * v) + keep * x0]) / sigma, arranged so a mask of ones returns v bit-exactly
        return self.mask * self.velocity_of(x_in, sigma) + (x - self.mask * x_in - keep * self.latent) / sigma


StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def sample(
    transformer, noise: torch.Tensor, sigmas: torch.Tensor, positive: Prompt,
    negative: Prompt | None = None, guidance: float = 3.5, reference: torch.Tensor | None = None,
    sampler: str = "euler", noise_level: float = 0.7, generator: torch.Generator | None = None,
    start_latent: torch.Tensor | None = None, noise_mask: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Denoise from `noise` along `sigmas` and return the model-space latent (float32).

    noise: [B, C, H, W]; positive/negative: one PromptEmbeds, or a schedule of TimedPrompts; start_latent:
    model-space latent to noise to sigmas[0] (img2img), or None to start from pure noise; noise_mask:
    [1 or B, 1, H, W] in 0..1 (resize_noise_mask), 1 = regenerate, 0 = keep start_latent (inpainting, needs
    start_latent); generator: CPU generator for the flow-sde step noise (reproducible across devices);
    on_step(i, total, x, x0_estimate) runs after every step -- progress, previews and Cancel live there.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    x = noise.float()
    velocity_of = guided_velocity(transformer, positive, negative, guidance, reference, x.shape[0], x.device)
    if noise_mask is not None:
        if start_latent is None:
            raise ValueError("a noise mask needs start_latent, the latent to keep where the mask is 0")
        velocity_of = InpaintVelocity(velocity_of, noise_mask.to(x.device).float(), start_latent.float(), x)
    if start_latent is not None:
        x = sigmas[0].item() * x + (1 - sigmas[0].item()) * start_latent.float()
    total = len(sigmas) - 1
    for i in range(total):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        velocity = velocity_of(x, sigma)
        x_prev = x
        if sampler == "euler" or sigma_next == 0.0:
            # flow-sde's last step (to sigma = 0) is Euler so no SDE noise is left in the image; the GRPO
            # trainer, which needs a log-prob for every step, uses flow_sde_step there too.
            x = euler_step(x, velocity, sigma, sigma_next)
        else:
            step_noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x, _, _ = flow_sde_step(x, velocity, sigmas, i, noise_level, step_noise)
        if on_step is not None:
            on_step(i, total, x, x_prev - sigma * velocity)
    return x
