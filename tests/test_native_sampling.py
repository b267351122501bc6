"""UniPic2 Schedule (native SIGMAS) and UniPic2 Flow-SDE Sampler (native SAMPLER) with native nodes, in the real host."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from unipic_core.inference.latents import LatentSpace
from unipic_core.inference.sampling import PromptEmbeds, euler_step, flow_sde_step, sample
from unipic_core.inference.schedule import denoise_sigmas, flow_sigmas
from unipic_core.models.dit import DiffusersDiT
from unipic_core.models.kontext_transformer import KontextSD3Transformer

SD3_VAE = LatentSpace(shift=0.0609, scale=1.5305)  # ComfyUI's SD3 latent format (LATENT is raw VAE space)
SHAPE = (2, 16, 16, 16)  # batch 2 of 128 x 128 px
GUIDANCE = 3.5


@pytest.fixture(scope="module")
def dit():
    """A tiny SD3.5-M-shaped DiT ComfyUI loads natively (hidden = 64 x depth, dual attention, RMS qk-norm)."""
    torch.manual_seed(0)
    return KontextSD3Transformer(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, num_attention_heads=2,
        attention_head_dim=64, caption_projection_dim=128, joint_attention_dim=32, pooled_projection_dim=24,
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


@pytest.fixture(scope="module")
def native(host, dit):
    """The same weights as a native MODEL, through Load Diffusion Model's loader."""
    import comfy.sd

    state_dict = {k: v.clone() for k, v in dit.state_dict().items()}  # the loader consumes its input
    return comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": torch.float32})


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(1)
    return [PromptEmbeds(torch.randn(1, 7, 32, generator=generator), torch.randn(1, 24, generator=generator))
            for _ in ("positive", "negative")]


def comfy_conditioning(prompt: PromptEmbeds) -> list:
    return [[prompt.tokens, {"pooled_output": prompt.pooled}]]


def native_sample(native, prompts, sampler, sigmas, seed: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """SamplerCustomAdvanced(RandomNoise, CFGGuider, sampler, sigmas) on `start` (raw; None: an empty latent)."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced

    positive, negative = (comfy_conditioning(p) for p in prompts)
    guider = CFGGuider.execute(native, positive, negative, GUIDANCE)[0]
    noise = RandomNoise.execute(seed)[0]
    latent = {"samples": torch.zeros(SHAPE) if start is None else start}
    return SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


def pack_sample(dit, prompts, sigmas, seed: int, **options) -> torch.Tensor:
    """UniPic2 Sampler's engine on the diffusers DiT, its seed convention (one CPU stream) -> raw latent."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(SHAPE, generator=generator, dtype=torch.float32)
    with torch.no_grad():
        x = sample(DiffusersDiT(dit), noise, sigmas, *prompts, guidance=GUIDANCE, generator=generator, **options)
    return SD3_VAE.to_raw(x)


def euler():
    from comfy_extras.nodes_custom_sampler import KSamplerSelect

    return KSamplerSelect.execute("euler")[0]


def flow_sde(host, noise_level: float):
    return host.node("UniPic2FlowSDESampler").get_sampler(noise_level)[0]


def official(host, native, steps: int, denoise: float = 1.0) -> torch.Tensor:
    return host.node("UniPic2Schedule").schedule(native, steps, denoise)[0]


@pytest.mark.parametrize("steps, denoise", [(1, 1.0), (6, 1.0), (50, 1.0), (10, 0.5), (7, 0.3)])
def test_schedule_is_the_official_one_at_the_models_shift(host, native, steps, denoise):
    sigmas = official(host, native, steps, denoise)
    assert torch.equal(sigmas, denoise_sigmas(steps, denoise, {"shift": 3.0}))  # SD3's shift, from the model
    if denoise == 1.0:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        assert torch.equal(sigmas, scheduler.sigmas)


def test_schedule_follows_model_sampling_sd3_and_differs_from_comfys_simple(host, native):
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    shifted = ModelSamplingSD3().patch(native, 5.0)[0]
    assert torch.equal(official(host, shifted, 12), flow_sigmas(12, {"shift": 5.0}))
    assert torch.equal(official(host, native, 12), flow_sigmas(12, {"shift": 3.0}))  # the input model is untouched
    simple = comfy.samplers.calculate_sigmas(native.get_model_object("model_sampling"), "simple", 12)
    assert (simple - official(host, native, 12)).abs().max() > 1e-3  # what the node's description warns of


def test_native_euler_on_the_official_schedule_equals_the_pack_sampler(host, native, dit, prompts):
    sigmas = official(host, native, 6)
    out = native_sample(native, prompts, euler(), sigmas, seed=5)
    ours = pack_sample(dit, prompts, sigmas, seed=5, sampler="euler")
    assert out.shape == SHAPE and out.std() > 0.1
    assert (out - ours).abs().max() <= 1e-4


def test_flow_sde_at_noise_level_zero_is_native_euler(host, native, prompts):
    sigmas = official(host, native, 6)
    assert torch.equal(native_sample(native, prompts, flow_sde(host, 0.0), sigmas, seed=5),
                       native_sample(native, prompts, euler(), sigmas, seed=5))


def test_flow_sde_is_stochastic_but_reproducible_from_the_seed(host, native, prompts):
    sigmas = official(host, native, 6)
    first = native_sample(native, prompts, flow_sde(host, 0.7), sigmas, seed=5)
    assert torch.equal(first, native_sample(native, prompts, flow_sde(host, 0.7), sigmas, seed=5))
    assert (first - native_sample(native, prompts, flow_sde(host, 0.7), sigmas, seed=6)).abs().max() > 0.1
    assert (first - native_sample(native, prompts, euler(), sigmas, seed=5)).abs().max() > 0.1


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_flow_sde_with_a_seed_gives_the_pack_samplers_flow_sde_image(host, native, dit, prompts, denoise):
    sigmas = official(host, native, 6, denoise)
    start = None if denoise == 1.0 else torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    out = native_sample(native, prompts, flow_sde(host, 0.7), sigmas, seed=9, start=start)
    ours = pack_sample(dit, prompts, sigmas, seed=9, sampler="flow-sde", noise_level=0.7,
                       start_latent=None if start is None else SD3_VAE.to_model(start))
    assert (out - ours).abs().max() <= 1e-4


def test_each_step_is_the_engines_flow_sde_step_and_the_last_is_euler(host):
    sample_flow_sde = host.module("nodes.host.native_sampling").sample_flow_sde
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([1.0, 0.6, 0.0])
    denoiser = (lambda x, sigma, **extra_args: 0.5 * x)  # any x0 estimate: the step is what is checked
    steps = []
    out = sample_flow_sde(denoiser, x, sigmas, extra_args={"seed": 3}, noise_level=0.7,
                          callback=lambda d: steps.append((d["i"], d["sigma"].item())))

    generator = torch.Generator().manual_seed(3)
    torch.randn(x.shape, generator=generator)  # the initial noise RandomNoise drew from the seed
    mid, _, std = flow_sde_step(x, x * 0.5, sigmas, 0, 0.7, torch.randn(x.shape, generator=generator))
    assert std > 0
    assert torch.equal(out, euler_step(mid, mid * 0.5 / 0.6, 0.6, 0.0))
    assert steps == [(0, 1.0), (1, pytest.approx(0.6))]

    fixed = torch.randn(x.shape)
    injected = sample_flow_sde(denoiser, x, sigmas[:2], noise_level=0.7, noise_sampler=lambda s, s_next: fixed)
    assert torch.equal(injected, flow_sde_step(x, x * 0.5, sigmas, 0, 0.7, fixed)[0])


def test_non_flow_models_and_schedules_are_refused_by_name(host, native, prompts):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingFlux

    eps = ModelSamplingDiscrete().patch(native, "eps", False)[0]  # how an SD1.5 model samples
    with pytest.raises(ValueError, match=r"UniPic2 Schedule: 'model' samples as ModelSamplingDiscrete \+ EPS"):
        official(host, eps, 6)
    flux = ModelSamplingFlux().patch(native, 1.15, 0.5, 1024, 1024)[0]
    with pytest.raises(ValueError, match="UniPic2 Schedule: 'model' samples as ModelSamplingFlux"):
        official(host, flux, 6)
    with pytest.raises(ValueError, match="UniPic2 Flow-SDE Sampler: the model samples as .*EPS"):
        native_sample(eps, prompts, flow_sde(host, 0.7), official(host, native, 2), seed=0)
    with pytest.raises(ValueError, match="UniPic2 Flow-SDE Sampler: the sigmas must fall from at most 1 to 0"):
        host.module("nodes.host.native_sampling").sample_flow_sde(None, torch.zeros(1, 16, 4, 4), torch.tensor([14.6, 1.0, 0.0]))
    required = host.nodes.NODE_CLASS_MAPPINGS["UniPic2Schedule"].INPUT_TYPES()["required"]
    assert required["steps"][1]["min"] == 1 and required["denoise"][1]["min"] > 0  # the host refuses 0 for both
