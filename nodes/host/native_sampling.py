"""UniPic2 Sampler's run through ComfyUI's own sampling, and the paper's schedule and sampler as native SIGMAS and
SAMPLER, to mix with SamplerCustomAdvanced and its nodes."""

import logging

import comfy.model_base
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
import torch.nn.functional as F
from tqdm.auto import trange

from ...unipic_core.inference.latents import LatentSpace
from ...unipic_core.inference.sampling import euler_step, flow_sde_step
from ...unipic_core.inference.schedule import denoise_sigmas
from . import memory, progress
from .conditioning import carries_reference, check_conditioning
from .native_kontext import has_kontext_reference, with_kontext_reference

log = logging.getLogger("unipic2")

FLOW_MODELS = "a flow-matching model such as SD3 / SD3.5 or UniPic2"
SAMPLER_NODE = "UniPic2 Sampler"
LATENT_CAUSE = "a VAE Encode of a broken image, or a failed earlier sampler"


def _sampling_kind(model_sampling) -> str:
    """How a model samples, in ComfyUI's words, e.g. 'ModelSamplingDiscrete + EPS' for SD1.5."""
    names = [c.__name__ for c in type(model_sampling).__mro__
             if c.__module__ == comfy.model_sampling.__name__ and c.__name__ != "ModelSampling"]
    return " + ".join(names) or type(model_sampling).__name__


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


def flow_sde_sampler(noise_level: float) -> FlowSDESampler:
    """The flow-sde SAMPLER at SDE noise scale `noise_level` (0 equals euler)."""
    return FlowSDESampler(sample_flow_sde, {"noise_level": noise_level})


def _grid_latent(raw: torch.Tensor, space: LatentSpace) -> torch.Tensor:
    """The latent resized to the DiT's patch grid when its sides are not multiples of the patch size."""
    height, width = raw.shape[-2:]
    grid_h, grid_w = space.grid_size(raw)
    if (grid_h, grid_w) == (height, width):
        return raw
    log.warning("%s: latent %dx%d resized to %dx%d (sides must be multiples of %d latent pixels, i.e. images a "
                "multiple of %d px)", SAMPLER_NODE, width, height, grid_w, grid_h, space.patch,
                space.patch * space.vae_factor)
    return F.interpolate(raw, size=(grid_h, grid_w), mode="bilinear", align_corners=False)


def sampling_model(model, shift: float, has_reference: bool):
    """The MODEL to sample with: refused unless it is an SD3 MMDiT (UniPic2-Kontext is one), shifted the
    ModelSamplingSD3 way when shift > 0, and given the reference ability when a reference is attached but the
    model (e.g. from Load Diffusion Model) lacks it."""
    if not isinstance(model.model, comfy.model_base.SD3):
        raise ValueError(f"{SAMPLER_NODE}: 'model' is a {type(model.model).__name__} model; UniPic2 Sampler runs "
                         "UniPic2-Kontext (an SD3 / SD3.5 MMDiT) -- load it with Load UniPic2 Kontext, or use "
                         "KSampler for other models")
    if shift > 0:
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3

        (model,) = ModelSamplingSD3().patch(model, shift)
    if has_reference and not has_kontext_reference(model):
        model = with_kontext_reference(model)
    return model


def model_latent(model, raw: torch.Tensor) -> torch.Tensor:
    """A LATENT's raw samples [B, C, H, W] as the MODEL's DiT takes them: checked for NaN, Empty Latent Image's 4
    channels widened to the model's, sides resized to the patch grid, refused when the DiT's grid is too small."""
    space = memory.latent_space(model)
    space.check_latent(raw, f"{SAMPLER_NODE}: 'latent'", LATENT_CAUSE)
    raw = comfy.sample.fix_empty_latent_channels(model, raw.float())  # Empty Latent Image's 4 -> 16 channels
    if raw.shape[1] != space.channels:
        raise ValueError(f"{SAMPLER_NODE}: 'latent' has {raw.shape[1]} channels; the model needs a "
                         f"{space.channels}-channel SD3 latent -- encode with the checkpoint's VAE (VAE Encode), or "
                         "start from Empty Latent Image")
    raw = _grid_latent(raw, space)
    dit = model.get_model_object("diffusion_model")
    space.check_grid_size(raw, f"{SAMPLER_NODE}: 'latent'", dit.pos_embed_max_size)
    return raw


def sample_latent(model, positive, negative, latent: dict, seed: int, steps: int, guidance: float, sampler: str,
                  noise_level: float, shift: float, denoise: float) -> dict:
    """UniPic2 Sampler's work: `latent` denoised with the MODEL on the official schedule by ComfyUI's sample_custom,
    so model patches, LoRAs, noise masks and the conditioning's timestep ranges, areas and masks apply as in
    KSampler. Returns the LATENT with its other keys (batch_index, noise_mask) kept."""
    model = sampling_model(model, shift, carries_reference(positive, negative))
    raw = model_latent(model, latent["samples"])
    dit = model.get_model_object("diffusion_model")
    widths = (dit.context_embedder.in_features, dit.y_embedder.mlp[0].in_features)
    check_conditioning(positive, SAMPLER_NODE, "positive", widths, raw.shape[0])
    check_conditioning(negative, SAMPLER_NODE, "negative", widths, raw.shape[0])
    sigmas = official_sigmas(model, steps, denoise, SAMPLER_NODE)
    # flow-sde's step noise continues the seed's stream after the initial noise, as the pack always drew it
    ksampler = comfy.samplers.ksampler("euler") if sampler == "euler" else flow_sde_sampler(noise_level)
    noise = comfy.sample.prepare_noise(raw, seed, latent.get("batch_index"))  # CPU, as KSampler draws it
    samples = comfy.sample.sample_custom(
        model, noise, guidance, ksampler, sigmas, positive, negative, raw, noise_mask=latent.get("noise_mask"),
        callback=progress.sampling_callback(model, len(sigmas) - 1),
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return {**latent, "samples": samples}
