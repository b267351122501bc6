"""The paper's schedule and sampler as native SIGMAS and SAMPLER, to mix with SamplerCustomAdvanced and its nodes."""

import comfy.model_sampling
import comfy.samplers
import torch
from tqdm.auto import trange

from ...unipic_core.sampling import euler_step, flow_sde_step
from ...unipic_core.schedule import denoise_sigmas

FLOW_MODELS = "a flow-matching model such as SD3 / SD3.5 or UniPic2"


def _sampling_kind(model_sampling) -> str:
    """How a model samples, in ComfyUI's words, e.g. 'ModelSamplingDiscrete + EPS' for SD1.5."""
    names = [c.__name__ for c in type(model_sampling).__mro__
             if c.__module__ == comfy.model_sampling.__name__ and c.__name__ != "ModelSampling"]
    return " + ".join(names) or type(model_sampling).__name__


class UniPic2Schedule:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("The official UniPic2 / SD3 schedule as SIGMAS for SamplerCustomAdvanced: sigma linear from 1 to 0 "
                   "over the steps, shifted by the model's shift (3.0 for UniPic2 and SD3.5; a ModelSamplingSD3 node "
                   "before this one changes it), exactly as diffusers' FlowMatchEulerDiscreteScheduler computes it. "
                   "ComfyUI's own simple / normal schedulers pick sigmas from a 1000-entry table and end higher, so "
                   "they differ slightly from the official schedule.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "schedule"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A flow-matching model (UniPic2, SD3 / SD3.5); its shift sets the "
                                "schedule."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Denoising steps (official: 50)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "Below 1, the "
                                  "last steps of a steps/denoise schedule (img2img), as BasicScheduler does."}),
        }}

    def schedule(self, model, steps, denoise):
        return (official_sigmas(model, steps, denoise, "UniPic2 Schedule"),)


def official_sigmas(model, steps: int, denoise: float, node: str) -> torch.Tensor:
    """The official schedule at the MODEL's shift (its model_sampling: the checkpoint's, or a ModelSamplingSD3
    node's); a model that is not SD3-style flow matching is refused naming `node`."""
    model_sampling = model.get_model_object("model_sampling")
    # The official schedule is SD3's static shift; Flux's resolution-dependent shift is another schedule.
    if not (isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
            and isinstance(model_sampling, comfy.model_sampling.CONST)):
        raise ValueError(f"{node}: 'model' samples as {_sampling_kind(model_sampling)}; the official schedule "
                         f"needs {FLOW_MODELS} (ModelSamplingDiscreteFlow) -- use BasicScheduler for this model")
    return denoise_sigmas(steps, denoise, {"shift": float(model_sampling.shift)})


def seeded_step_noise(x: torch.Tensor, seed: int | None):
    """noise_sampler(sigma, sigma_next) -> float32 noise shaped like x, drawn on the CPU from `seed`.

    A CPU generator gives the same noise on any device. The stream first skips one x-sized draw: RandomNoise (and
    UniPic2 Sampler) drew the initial noise from the same seed that way, so the steps continue that stream instead
    of repeating the initial noise, and the same seed gives UniPic2 Sampler's flow-sde image. No seed: the global
    generator, as ComfyUI's samplers do.
    """
    generator = torch.default_generator if seed is None else torch.Generator().manual_seed(seed)
    torch.randn(x.shape, generator=generator, dtype=torch.float32)
    return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)


@torch.no_grad()
def sample_flow_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_level=0.7,
                    noise_sampler=None):
    """The Flow-GRPO SDE sampler with ComfyUI's sampler signature (comfy.k_diffusion.sampling).

    model(x, sigma * s_in, **extra_args) returns the denoised x0, so the flow velocity is (x - x0) / sigma. Every
    step is unipic_core's flow_sde_step except a step to sigma 0, which is Euler so no SDE noise is left in the
    image (UniPic2 Sampler's rule). x: [B, C, H, W] noised latent; sigmas: falling from at most 1 to at least 0.
    """
    extra_args = {} if extra_args is None else extra_args
    if len(sigmas) > 1 and (sigmas[0] > 1 or sigmas[-1] < 0 or bool((sigmas[1:] >= sigmas[:-1]).any())):
        raise ValueError(f"UniPic2 Flow-SDE Sampler: the sigmas must fall from at most 1 to 0 (a flow-matching "
                         f"schedule such as UniPic2 Schedule's); got {sigmas.tolist()}")
    if noise_sampler is None:
        noise_sampler = seeded_step_noise(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        velocity = (x - denoised) / sigma
        step_noise = noise_sampler(sigma, sigma_next)  # drawn on every step, as UniPic2 Sampler does
        if sigma_next == 0:
            x = euler_step(x, velocity, sigma.item(), 0.0)
        else:
            x, _, _ = flow_sde_step(x, velocity, sigmas, i, noise_level, step_noise)
    return x


class FlowSDESampler(comfy.samplers.KSAMPLER):
    """KSAMPLER running sample_flow_sde that refuses a model that is not flow-matching, whose x0 the SDE misreads."""

    def sample(self, model_wrap, sigmas, *args, **kwargs):
        model_sampling = model_wrap.inner_model.model_sampling
        if not isinstance(model_sampling, comfy.model_sampling.CONST):
            raise ValueError(f"UniPic2 Flow-SDE Sampler: the model samples as {_sampling_kind(model_sampling)}; "
                             f"flow-sde needs {FLOW_MODELS} -- choose another sampler for this model")
        return super().sample(model_wrap, sigmas, *args, **kwargs)


class UniPic2FlowSDESampler:
    CATEGORY = "UniPic2/sampling"
    DESCRIPTION = ("The UniPic2 paper's Flow-GRPO SDE sampler as a SAMPLER for SamplerCustomAdvanced: every step adds "
                   "fresh noise scaled by noise_level (0 equals euler), and the last step to sigma 0 is an Euler "
                   "step so no noise is left in the image. The step noise comes from the Noise input's seed, so "
                   "the same seed gives the same image on any device, and UniPic2 Sampler's flow-sde image. For "
                   "flow-matching models (UniPic2, SD3 / SD3.5).")
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "noise_level": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "SDE noise "
                                      "scale a (paper: 0.7); 0 equals euler."}),
        }}

    def get_sampler(self, noise_level):
        return (FlowSDESampler(sample_flow_sde, {"noise_level": noise_level}),)
