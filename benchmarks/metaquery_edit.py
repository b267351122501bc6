"""Benchmark (not a test): one MetaQuery edit end to end through the pack's nodes, time and peak memory, with
ComfyUI's normal memory mode and with the GPU capped to a smaller card's memory.

    python -m benchmarks.metaquery_edit [--sizes tiny mid] [--full-size] [--image-size 1024] [--steps 10]
                                        [--repeats 2] [--caps 12 8] [--device cpu|cuda]

from the repository root, where `unipic_core`, `tools` and the `benchmarks` package import.

The edit is the README's MetaQuery edit workflow (workflows/unipic2_metaquery_edit.json) called node by node in
ComfyUI imported here (the tests' host), its memory manager placing every model: Load UniPic2 MetaQuery (dtype
default) -> UniPic2 MetaQuery Encode (prompt and negative, the edit image and the VAE) -> UniPic2 Sampler (euler,
guidance 3.5) -> VAE Decode. Its time is split into encode (the MLLM and conditioner put on the device, the encode,
the reference's VAE encode), sampling (the DiT put on the device, --steps steps: time scales with the steps, the
workflow's default is 50) and decode.

Legs, same process, same weights: ComfyUI's normal mode, then each cap in --caps (GB; default 12 8 on a GPU; on the
CPU caps are refused, as ComfyUI keeps every weight in RAM there). A cap makes the GPU a card of that size: one
allocation holds the rest, so every free-memory query ComfyUI makes (the load planning that partially loads the
MLLM and the DiT, VAE decode's batching, the batching of the positive and negative) sees the smaller card, and the
device itself refuses more (--reserve-vram would move only the load planning, set_per_process_memory_fraction
only the refusal). Between legs every model is unloaded and the allocator's cache emptied. Each leg runs one
warm-up edit (its loads onto the device, as a graph's first run) then --repeats, the lowest figures kept, with the
models left loaded between edits as ComfyUI leaves them. Prints seconds per edit (encode / sampling / decode), the
peak memory and the ratios to the normal leg, and whether the leg stayed under its cap; a leg that runs out of
memory says so and the others still run. Peak memory is benchmarks.harness.PeakMemory's: on a GPU all torch held
at the peak (the weights on the device included, the cap's filler not), on the CPU the growth of the process RSS.

Sizes: --sizes, the tiny checkpoints (unipic_core.tiny); --full-size, random bf16 weights at UniPic2-MetaQuery's
sizes (Qwen2.5-VL-7B-Instruct, the SD3.5-M DiT, SD3's VAE, the conditioner: unipic_core.tiny.
write_full_size_metaquery_folder), ~21 GB written to a temporary folder and read by the pack's loader. Its
tokenizer is the tiny byte-level one, whose ids lie in the 7B's vocabulary: a prompt is more tokens than with the
real tokenizer (a few hundred, against the edit image's 1024 at 1024 px), so encoding is a little slower.
"""

import contextlib
import gc
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from benchmarks.harness import NativeHost, PeakMemory, benchmark_parser, ratios
from unipic_core.tiny import write_full_size_metaquery_folder, write_metaquery_folder

# the workflow's prompts and sampler settings
PROMPT = "make the house blue and add snow on the mountains"
NEGATIVE = ("blurry, low quality, low resolution, distorted, deformed, broken content, missing parts, damaged details, "
            "artifacts, glitch, noise, pixelated, grainy, compression artifacts, bad composition, wrong proportion, "
            "incomplete editing, unfinished, unedited areas.")
SAMPLER = dict(seed=42, guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)
STAGES = ("encode", "sampling", "decode")


def timed(device: torch.device, fn, *args, **kwargs):
    """(fn's result, its seconds), waiting for the GPU."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


class Edit:
    """The workflow's nodes on one checkpoint, loaded once; a call is one edit and returns its stages' seconds."""

    def __init__(self, host: NativeHost, checkpoint: str, image_size: int, steps: int, device: torch.device):
        inside = host.pack.nodes.loader_nodes.INSIDE
        with torch.inference_mode():  # as ComfyUI runs nodes
            (self.model, self.mllm, self.vae), self.load_seconds = timed(
                device, host.node("LoadUniPic2MetaQuery").load, checkpoint, inside, "default")
        self.encoder, self.sampler, self.decoder = (host.node(name) for name in
                                                    ("UniPic2MetaQueryEncode", "UniPic2Sampler", "VAEDecode"))
        self.image = torch.rand(1, image_size, image_size, 3, generator=torch.Generator().manual_seed(0))
        self.size, self.steps, self.device = image_size, steps, device

    def __call__(self) -> dict[str, float]:
        with torch.inference_mode():  # as ComfyUI runs nodes
            (positive, negative, latent), encode = timed(
                self.device, self.encoder.encode, self.mllm, PROMPT, NEGATIVE, "longer edge", self.size, 32,
                image=self.image, vae=self.vae)
            (samples,), sampling = timed(self.device, self.sampler.sample, self.model, positive, negative, latent,
                                         steps=self.steps, **SAMPLER)
            _, decode = timed(self.device, self.decoder.decode, self.vae, samples)
        return dict(encode=encode, sampling=sampling, decode=decode)


@contextlib.contextmanager
def capped(device: torch.device, cap_gb: float | None):
    """The GPU as a card of cap_gb GiB (as cards are sized) while inside, None: as it is; yields the bytes the
    filler holds."""
    if cap_gb is None:
        yield 0
        return
    blocked = torch.cuda.get_device_properties(device).total_memory - int(cap_gb * 2**30)
    filler = torch.empty(blocked, dtype=torch.uint8, device=device)
    try:
        yield blocked
    finally:
        del filler
        torch.cuda.empty_cache()


def unload_all() -> None:
    """Every model off the device and the allocator's cache emptied, so a leg starts as a fresh ComfyUI would."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


def run_leg(edit: Edit, cap_gb: float | None, repeats: int) -> tuple[dict[str, float], float]:
    """(lowest seconds per stage, lowest peak MiB) of `repeats` edits after a warm-up, under `cap_gb`."""
    unload_all()
    with capped(edit.device, cap_gb) as blocked:
        edit()
        runs = []
        for _ in range(repeats):
            with PeakMemory(edit.device) as memory:
                seconds = edit()
            held = (memory.start - blocked) / 2**20 if edit.device.type == "cuda" else 0.0
            runs.append((seconds, memory.peak + held))
    return {stage: min(s[stage] for s, _ in runs) for stage in STAGES}, min(m for _, m in runs)


def report(size: str, edit: Edit, caps: list[float], repeats: int) -> None:
    print(f"{size:>9}: loaded in {edit.load_seconds:.1f} s")
    reference = None
    for cap in [None, *caps]:
        leg = "normal" if cap is None else f"cap {cap:g} GB"
        try:
            stages, peak = run_leg(edit, cap, repeats)
        except torch.OutOfMemoryError as err:
            print(f"{size:>9} {leg:>10}: out of memory under the cap ({str(err).splitlines()[0]})")
            continue
        total = sum(stages.values())
        split = " / ".join(f"{stages[stage]:7.2f}" for stage in STAGES)
        line = f"{size:>9} {leg:>10}: {total:7.2f} s per edit ({split} s encode / sampling / decode) {peak:9.1f} MiB"
        if reference is None:
            reference = (total, peak)
        else:
            line += f" | /normal {ratios((total, peak), reference, 2)}"
        if cap is not None:
            line += f" | under the cap: {'yes' if peak <= cap * 1024 else 'NO'}"
        print(line)


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--full-size", action="store_true", help="also UniPic2-MetaQuery's sizes, random bf16 weights "
                        "(~21 GB written to a temporary folder)")
    parser.add_argument("--image-size", type=int, default=1024, help="square edit image and output, px (multiple "
                        "of 32)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (time scales with them)")
    parser.add_argument("--repeats", type=int, default=2, help="measured edits per leg, after one warm-up")
    parser.add_argument("--caps", type=float, nargs="*", help="GPU memory caps, GB (default 12 8 on a GPU; none on "
                        "the CPU, which refuses caps); --caps alone: none")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.caps is None:
        args.caps = [12.0, 8.0] if device.type == "cuda" else []
    if args.caps and device.type != "cuda":
        parser.error("--caps needs a GPU: on the CPU ComfyUI keeps every weight in RAM, so a cap means nothing "
                     "(give --caps alone for none)")
    caps = ", ".join(f"{cap:g} GB" for cap in args.caps) or "none"
    print(f"device {device}, torch {torch.__version__}, {args.image_size}px edit, {args.steps} steps, CFG on, "
          f"{args.repeats} repeats after a warm-up, caps: {caps}")
    transformers_logging.disable_progress_bar()  # the writers' and loaders' bars would break up the figures
    with tempfile.TemporaryDirectory() as tmp:
        host = NativeHost(f"{tmp}/host", device, pytorch_attention=False)
        import comfy.utils
        import folder_paths

        comfy.utils.set_progress_bar_enabled(False)
        models = Path(tmp) / "models"
        folder_paths.add_model_folder_path("unipic2", str(models))  # where the loader lists checkpoints
        checkpoints = {size: lambda out, size=size: write_metaquery_folder(out, size) for size in args.sizes}
        if args.full_size:
            checkpoints["full-size"] = write_full_size_metaquery_folder
        for size, write in checkpoints.items():
            name = f"UniPic2-MetaQuery-{size}"
            _, seconds = timed(device, write, models / name)
            print(f"{size:>9}: wrote {name} in {seconds:.1f} s")
            report(size, Edit(host, name, args.image_size, args.steps, device), args.caps, args.repeats)
            unload_all()


if __name__ == "__main__":
    main()
