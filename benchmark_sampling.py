"""Benchmark (not a test): the project's sampler against a reference loop, same process, same weights and inputs.

    python benchmark_sampling.py [--sizes tiny mid] [--steps 8] [--resolution 512] [--device cpu|cuda] [--full-size]

Text-to-image runs against diffusers' StableDiffusion3Pipeline (latent output, given embeddings and latents);
editing against a plain loop over diffusers' FlowMatchEulerDiscreteScheduler calling the same Kontext DiT with
the reference latent. Prints time per step and peak memory, and the ratio project / reference (target <= 1.0).
Peak memory is CUDA's max_memory_allocated on a GPU, and on the CPU the growth of the process RSS (sampled every
2 ms, after returning freed heap to the OS with malloc_trim).
--full-size builds SD3.5-Medium's DiT with random weights (GPU: bf16 at 512^2 and 1024^2).
"""

import argparse
import ctypes
import gc
import tempfile
import threading
import time

import psutil
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from unipic_core.kontext_transformer import KontextSD3Transformer
from unipic_core.loading import load_kontext
from unipic_core.sampling import PromptEmbeds, sample
from unipic_core.schedule import flow_sigmas
from unipic_core.tiny import SD35M_TRANSFORMER, write_kontext_folder

SCHEDULER = {"shift": 3.0}


class PeakMemory:
    """Peak memory above the starting level during a `with` block, in MiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            # hand freed heap back to the OS first, so the growth measured is this run's, not a reuse of the last
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.process = psutil.Process()
            self.start = self.process.memory_info().rss
            self.running = True
            self.high = self.start
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.high = max(self.high, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            high = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            high = self.high
        self.peak = (high - self.start) / 2**20


def measure(fn, device) -> tuple[float, float]:
    """(seconds, peak MiB) of one call."""
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, memory.peak


def compare(ours, theirs, device, repeats=5) -> tuple[tuple[float, float], tuple[float, float]]:
    """((seconds, MiB) of ours, of theirs): runs alternate after one warm-up each, so a slow spell on a noisy
    machine hits both; the lowest of the repeats is kept for each figure."""
    ours(), theirs()
    runs = {ours: [], theirs: []}
    for _ in range(repeats):
        for fn in (ours, theirs):
            runs[fn].append(measure(fn, device))
    return tuple((min(t for t, _ in runs[fn]), min(m for _, m in runs[fn])) for fn in (ours, theirs))


def report(label: str, unit: str, per: int, ours: tuple[float, float], theirs: tuple[float, float]) -> None:
    (t_ours, m_ours), (t_ref, m_ref) = ours, theirs
    print(f"{label}  project {t_ours / per * 1000:8.1f} {unit} {m_ours:8.1f} MiB | reference "
          f"{t_ref / per * 1000:8.1f} {unit} {m_ref:8.1f} MiB | ratio time {t_ours / t_ref:.3f} "
          f"memory {m_ours / max(m_ref, 1e-6):.3f}")


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


def bench(name, transformer, device, dtype, resolution, steps, guidance=3.5):
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    noise = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device, dtype)
    ref = torch.randn(1, cfg.in_channels, side, side, generator=g).to(device, dtype)
    embeds = [PromptEmbeds(torch.randn(1, 333, cfg.joint_attention_dim, generator=g).to(device, dtype),
                           torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype)) for _ in "pn"]
    pos, neg = embeds
    sigmas = flow_sigmas(steps, SCHEDULER)
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(
        **SCHEDULER), text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae_scale_factor = 8

    cases = {
        "t2i": (lambda: sample(transformer, noise, sigmas, pos, neg, guidance),
                lambda: pipe(prompt_embeds=pos.tokens, pooled_prompt_embeds=pos.pooled, negative_prompt_embeds=neg.tokens,
                             negative_pooled_prompt_embeds=neg.pooled, latents=noise, height=resolution,
                             width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                             output_type="latent")),
        "edit": (lambda: sample(transformer, noise, sigmas, pos, neg, guidance, reference=ref),
                 lambda: reference_edit_loop(transformer, noise, ref, pos, neg, steps, guidance)),
    }
    with torch.no_grad():
        for task, (ours, theirs) in cases.items():
            report(f"{name:>10} {task:>4} {resolution:>5}px", "ms/step", steps, *compare(ours, theirs, device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"], help="tiny checkpoint configs to run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-size", action="store_true", help="SD3.5-M DiT, random weights (bf16 on GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {args.steps} steps, CFG on")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            transformer = load_kontext(write_kontext_folder(f"{tmp}/{size}", size)).transformer.to(device)
            bench(size, transformer, device, torch.float32, args.resolution, args.steps)
    if args.full_size:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        transformer = KontextSD3Transformer(**SD35M_TRANSFORMER).to(device, dtype).eval()
        for resolution in (512, 1024):
            bench("SD3.5-M", transformer, device, dtype, resolution, args.steps)


if __name__ == "__main__":
    main()
