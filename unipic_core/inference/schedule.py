"""Flow-matching noise schedules, computed the way diffusers' FlowMatchEulerDiscreteScheduler computes them.

sigma runs from ~1 (pure noise) to 0 (clean); the DiT is fed timestep = sigma * 1000. The inference grid is
linear between the (shifted) training sigmas at t=1000 and t=1, then shifted once more -- diffusers' exact
recipe, so a scheduler_config.json gives bit-identical sigmas here and in diffusers.
"""

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """Static SD3 shift: s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_sigmas(sigmas, mu: float):
    """Resolution-dependent (exponential) shift: e^mu / (e^mu + 1/sigma - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def dynamic_shift_mu(image_seq_len: int, config: dict) -> float:
    """mu grows linearly with the number of image tokens, between base_shift and max_shift."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len
    return image_seq_len * slope + intercept


def flow_sigmas(steps: int, config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """The steps+1 sigmas (float32, last one 0) of a scheduler config for `steps` inference steps.

    config: the dict in scheduler/scheduler_config.json (keys shift, use_dynamic_shifting, base_shift, ...).
    image_seq_len: DiT tokens of the target (H/16 * W/16 for SD3); needed only with dynamic shifting.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    shift = float(config.get("shift", 1.0))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    unsupported = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                               "shift_terminal") if config.get(k)]
    if unsupported or config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"scheduler_config.json: {unsupported or 'time_shift_type'} is not supported by UniPic2")

    # Training-time sigma range, in float32 like diffusers keeps it.
    train = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    if not dynamic:
        train = shift_sigmas(train, shift)
    sigma_max, sigma_min = train[0].item(), train[-1].item()

    sigmas = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, steps)
    sigmas = sigmas / NUM_TRAIN_TIMESTEPS
    if dynamic:
        if image_seq_len is None:
            raise ValueError("dynamic shifting needs image_seq_len (the number of DiT tokens of the target)")
        sigmas = dynamic_shift_sigmas(sigmas, dynamic_shift_mu(image_seq_len, config))
    else:
        sigmas = shift_sigmas(sigmas, shift)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def denoise_sigmas(steps: int, denoise: float, config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """Sigmas for img2img: the last steps+1 of a schedule stretched to steps/denoise steps (as ComfyUI does)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise == 1.0:
        return flow_sigmas(steps, config, image_seq_len)
    total = max(steps, int(steps / denoise))
    return flow_sigmas(total, config, image_seq_len)[-(steps + 1):]
