"""Benchmark (not a test): the engine's host-free sampling loop (unipic_core.inference.sampling.sample, as the GRPO
trainer and torchrun sample) and ComfyUI's native sampling (the path UniPic2 Sampler and SamplerCustomAdvanced take) against a
reference loop, same process, same weights and inputs.

    python -m benchmarks.sampling [--sizes tiny mid] [--steps 8] [--resolution 512] [--device cpu|cuda] [--full-size]
                                  [--use-pytorch-cross-attention]

from the repository root, where `unipic_core`, `tools` and the `benchmarks` package import.

Text-to-image runs against diffusers' StableDiffusion3Pipeline (latent output, given embeddings and latents);
editing against a plain loop over diffusers' FlowMatchEulerDiscreteScheduler calling the same Kontext DiT with
the reference latent. The native leg is ComfyUI (the tests' host, imported here) sampling the same weights loaded
by Load Diffusion Model's loader, made to edit by the pack's Kontext reference patch: CFGGuider + euler on the
official sigmas, as UniPic2 Sampler runs it, the reference as `reference_latents` on the positive.
Prints time per step and peak memory, the ratios project (the engine loop) / reference and native / reference
(target <= 1.0), and the largest difference between the native and the project latents (the parity tests allow
1e-4 in fp32).
Peak memory is measured as benchmarks.harness.PeakMemory does (CUDA's max_memory_allocated on a GPU, the process
RSS growth on the CPU).
--full-size builds SD3.5-Medium's DiT with random weights (GPU: bf16 at 512^2 and 1024^2).
"""

import tempfile

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from benchmarks.harness import NativeHost, benchmark_parser, compare, full_size_dit, random_prompt_embeds, ratios
from unipic_core.inference.latents import SD3
from unipic_core.inference.sampling import PromptEmbeds, sample
from unipic_core.inference.schedule import flow_sigmas
from unipic_core.models.dit import DiffusersDiT
from unipic_core.models.loading import load_kontext
from unipic_core.tiny import write_kontext_folder

SCHEDULER = {"shift": 3.0}


def report(label: str, per: int, figures: dict, native_gap: float) -> None:
    """One line: ms per step and MiB of each leg, then each leg's ratios to the reference."""
    legs = " | ".join(f"{name} {t / per * 1000:8.1f} ms/step {m:8.1f} MiB" for name, (t, m) in figures.items())
    to_reference = " | ".join(f"{name}/ref {ratios(figure, figures['reference'])}"
                              for name, figure in figures.items() if name != "reference")
    print(f"{label}  {legs} || {to_reference} || native-project max |diff| {native_gap:.1e}")


def reference_edit_loop(transformer, noise, ref, pos, neg, steps, guidance):
    """What a reader would write with diffusers' scheduler: CFG batched, scheduler.step per step."""
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps, device=noise.device)
    latents = noise
    tokens, pooled = torch.cat([neg.tokens, pos.tokens]), torch.cat([neg.pooled, pos.pooled])
    refs = torch.cat([ref, ref])
    for t in scheduler.timesteps:
        v = transformer(hidden_states=torch.cat([latents, latents]), encoder_hidden_states=tokens,
                        pooled_projections=pooled, timestep=t.expand(2 * latents.shape[0]),
                        ref_hidden_states=refs, return_dict=False)[0]
        v_neg, v_pos = v.chunk(2)
        latents = scheduler.step(v_neg + guidance * (v_pos - v_neg), t, latents, return_dict=False)[0]
    return latents


def native_sampler(model, noise, sigmas, pos, neg, guidance, reference=None):
    """A call of SamplerCustomAdvanced's path (CFGGuider, euler, given sigmas) -> model-space latent, like `sample`.

    `noise` and `reference` are model-space latents, as `sample` takes them; ComfyUI's LATENT is raw VAE space.
    """
    import comfy.samplers

    extra = {} if reference is None else {"reference_latents": [model.model.process_latent_out(reference)]}
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[pos.tokens, {"pooled_output": pos.pooled, **extra}]],
                     [[neg.tokens, {"pooled_output": neg.pooled}]])  # the patch gives the negative the reference
    guider.set_cfg(guidance)
    euler = comfy.samplers.sampler_object("euler")
    empty = torch.zeros_like(noise)  # an empty raw latent: at sigma 1 the start is the noise alone
    return lambda: model.model.process_latent_in(
        guider.sample(noise, empty, euler, sigmas, disable_pbar=True, seed=0).to(noise.device))


def bench(name, transformer, native, device, dtype, resolution, steps, guidance=3.5):
    cfg = transformer.config
    dit = DiffusersDiT(transformer)
    g = torch.Generator().manual_seed(0)
    shape = SD3.shape(resolution, resolution)
    noise = torch.randn(1, *shape, generator=g).to(device, dtype)
    ref = torch.randn(1, *shape, generator=g).to(device, dtype)
    pos, neg = (PromptEmbeds(e.tokens.to(device, dtype), e.pooled.to(device, dtype))
                for e in random_prompt_embeds(cfg, g))
    sigmas = flow_sigmas(steps, SCHEDULER)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(
        **SCHEDULER), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae_scale_factor = SD3.vae_factor

    cases = {
        "t2i": dict(
            project=lambda: sample(dit, noise, sigmas, pos, neg, guidance),
            native=native_sampler(native, noise, sigmas, pos, neg, guidance),
            reference=lambda: pipe(prompt_embeds=pos.tokens, pooled_prompt_embeds=pos.pooled,
                                   negative_prompt_embeds=neg.tokens, negative_pooled_prompt_embeds=neg.pooled,
                                   latents=noise, height=resolution, width=resolution, num_inference_steps=steps,
                                   guidance_scale=guidance, output_type="latent")),
        "edit": dict(
            project=lambda: sample(dit, noise, sigmas, pos, neg, guidance, reference=ref),
            native=native_sampler(native, noise, sigmas, pos, neg, guidance, reference=ref),
            reference=lambda: reference_edit_loop(transformer, noise, ref, pos, neg, steps, guidance)),
    }
    with torch.no_grad():
        for task, legs in cases.items():
            gap = (legs["native"]() - legs["project"]()).abs().max().item()
            report(f"{name:>10} {task:>4} {resolution:>5}px", steps, compare(legs, device), gap)


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--full-size", action="store_true", help="SD3.5-M DiT, random weights (bf16 on GPU)")
    parser.add_argument("--use-pytorch-cross-attention", action="store_true",
                        help="ComfyUI's flag: native attention by torch's SDPA, as the other legs use (ComfyUI's "
                        "default on a CPU is sub-quadratic attention, on an NVIDIA GPU SDPA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        host = NativeHost(f"{tmp}/host", device, args.use_pytorch_cross_attention)
        print(f"device {device}, torch {torch.__version__}, {args.steps} steps, CFG on, "
              f"native attention {host.attention}")
        for size in args.sizes:
            transformer = load_kontext(write_kontext_folder(f"{tmp}/{size}", size)).transformer.to(device)
            bench(size, transformer, host.model(transformer, torch.float32), device, torch.float32,
                  args.resolution, args.steps)
        if args.full_size:
            transformer = full_size_dit(device)
            native = host.model(transformer, transformer.dtype)
            for resolution in (512, 1024):
                bench("SD3.5-M", transformer, native, device, transformer.dtype, resolution, args.steps)


if __name__ == "__main__":
    main()
