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

Legs, same process, same weights: ComfyUI's normal mode, then each cap in --caps (GiB; default 12 8 on a GPU; on the
CPU caps are refused, as ComfyUI keeps every weight in RAM there). A cap makes the GPU a card of that size: one
allocation holds the rest, so every free-memory query ComfyUI makes (the load planning that partially loads the
MLLM and the DiT, VAE decode's batching, the batching of the positive and negative) sees the smaller card, and the
device itself refuses more (--reserve-vram would move only the load planning, set_per_process_memory_fraction
only the refusal). Between legs every model is unloaded and the allocator's cache emptied. Each leg runs one
warm-up edit (its loads onto the device, as a graph's first run) then --repeats, the lowest figures kept, with the
models left loaded between edits as ComfyUI leaves them. Prints seconds per edit (encode / sampling / decode), the
peak memory and the ratios to the normal leg. A capped leg that finishes fitted its cap (the device refuses more);
one that runs out of memory says so and the others still run, and a leg whose VAE ComfyUI retried in tiles after
running out of memory (it only logs a warning) is marked. Peak memory is benchmarks.harness.PeakMemory's: on a GPU
the memory torch had allocated at the peak (the weights on the device included, the cap's filler, the allocator's
free cache and the CUDA context not), on the CPU the growth of the process RSS.

Sizes: --sizes, the tiny checkpoints (unipic_core.tiny); --full-size, random bf16 weights at UniPic2-MetaQuery's
sizes (Qwen2.5-VL-7B-Instruct, the SD3.5-M DiT, SD3's VAE, the conditioner: unipic_core.tiny.
write_full_size_metaquery_folder), ~22 GB written to a temporary folder (TMPDIR) and read by the pack's loader. Its
tokenizer is the tiny byte-level one, whose ids lie in the 7B's vocabulary: a prompt is more tokens than with the
real tokenizer (a few hundred, against the edit image's 1024 at 1024 px), so encoding is a little slower.
"""

import contextlib
import gc
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from benchmarks.harness import NativeHost, PeakMemory, benchmark_parser, ratios, timed
from unipic_core.tiny import write_full_size_metaquery_folder, write_metaquery_folder

# the workflow's prompts and sampler settings
PROMPT = "make the house blue and add snow on the mountains"
NEGATIVE = ("blurry, low quality, low resolution, distorted, deformed, broken content, missing parts, damaged details, "
            "artifacts, glitch, noise, pixelated, grainy, compression artifacts, bad composition, wrong proportion, "
            "incomplete editing, unfinished, unedited areas.")
SAMPLER = dict(seed=42, guidance=3.5, sampler="euler", noise_level=0.7, shift=0.0, denoise=1.0)
STAGES = ("encode", "sampling", "decode")
FULL_SIZE_BYTES = 24 * 10**9  # the full-size folder's ~22 GB, with room to spare


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


class OutOfMemory(Exception):
    """A leg that ran out of memory (or whose cap could not be set up), with the reason."""


def out_of_memory(err: BaseException) -> bool:
    """torch's allocator raises OutOfMemoryError; cuBLAS / cuDNN workspaces and lazy CUDA module loads a RuntimeError
    that only says so in its text."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


class TiledRetries(logging.Handler):
    """Counts ComfyUI's VAE running out of memory and retrying in tiles (it only logs a warning), so a leg's slower
    decode is not taken for the cap's streaming."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += "retrying with tiled" in record.getMessage()


@contextlib.contextmanager
def capped(device: torch.device, cap_gb: float | None):
    """The GPU as a card of cap_gb GiB (as cards are sized) while inside, None: as it is; yields the bytes the
    filler holds."""
    if cap_gb is None:
        yield 0
        return
    blocked = torch.cuda.get_device_properties(device).total_memory - int(cap_gb * 2**30)
    try:
        filler = torch.empty(blocked, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError as err:  # something an earlier leg left on the device
        raise OutOfMemory(f"the cap could not be set up: {str(err).splitlines()[0]}") from err
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
    """(lowest seconds per stage, lowest peak MiB) of `repeats` edits after a warm-up, under `cap_gb`; OutOfMemory
    when an edit did not fit."""
    unload_all()
    with capped(edit.device, cap_gb) as blocked:
        try:
            edit()
            runs = []
            for _ in range(repeats):
                with PeakMemory(edit.device) as memory:
                    seconds = edit()
                held = (memory.start - blocked) / 2**20 if edit.device.type == "cuda" else 0.0
                runs.append((seconds, memory.peak + held))
        except RuntimeError as err:  # OutOfMemoryError is one
            if not out_of_memory(err):
                raise
            raise OutOfMemory(str(err).splitlines()[0]) from err
    return {stage: min(s[stage] for s, _ in runs) for stage in STAGES}, min(m for _, m in runs)


def report(size: str, edit: Edit, caps: list[float], repeats: int) -> None:
    print(f"{size:>9}: loaded in {edit.load_seconds:.1f} s")
    reference = None
    for cap in [None, *caps]:
        leg = "normal" if cap is None else f"cap {cap:g} GiB"
        tiled = TiledRetries()
        logging.getLogger().addHandler(tiled)
        try:
            stages, peak = run_leg(edit, cap, repeats)
        except OutOfMemory as err:
            print(f"{size:>9} {leg:>10}: out of memory ({err})")
            continue
        finally:
            logging.getLogger().removeHandler(tiled)
        total = sum(stages.values())
        split = " / ".join(f"{stages[stage]:7.2f}" for stage in STAGES)
        line = f"{size:>9} {leg:>10}: {total:7.2f} s per edit ({split} s encode / sampling / decode) {peak:9.1f} MiB"
        if reference is None:
            reference = (total, peak)
        else:
            line += f" | /normal {ratios((total, peak), reference, 2)}"
        if tiled.count:
            line += f" | VAE tiled after running out of memory ({tiled.count}x)"
        print(line)


def main():
    parser = benchmark_parser(__doc__)
    parser.add_argument("--full-size", action="store_true", help="also UniPic2-MetaQuery's sizes, random bf16 weights "
                        "(~22 GB written to a temporary folder)")
    parser.add_argument("--image-size", type=int, default=1024, help="square edit image and output, px (multiple "
                        "of 32)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (time scales with them)")
    parser.add_argument("--repeats", type=int, default=2, help="measured edits per leg, after one warm-up")
    parser.add_argument("--caps", type=float, nargs="*", help="GPU memory caps, GiB (default 12 8 on a GPU; none on "
                        "the CPU, which refuses caps); --caps alone: none")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.caps is None:
        args.caps = [12.0, 8.0] if device.type == "cuda" else []
    if args.caps and device.type != "cuda":
        parser.error("--caps needs a GPU: on the CPU ComfyUI keeps every weight in RAM, so a cap means nothing "
                     "(give --caps alone for none)")
    if args.caps and max(args.caps) * 2**30 >= torch.cuda.get_device_properties(device).total_memory:
        parser.error(f"--caps {max(args.caps):g} GiB is not below this GPU's memory")
    caps = ", ".join(f"{cap:g} GiB" for cap in args.caps) or "none"
    print(f"device {device}, torch {torch.__version__}, {args.image_size}px edit, {args.steps} steps, CFG on, "
          f"{args.repeats} repeats after a warm-up, caps: {caps}")
    transformers_logging.disable_progress_bar()  # the writers' and loaders' bars would break up the figures
    with tempfile.TemporaryDirectory() as tmp:
        if args.full_size and shutil.disk_usage(tmp).free < FULL_SIZE_BYTES:
            raise SystemExit(f"--full-size needs {FULL_SIZE_BYTES / 1e9:.0f} GB free in {tmp}, which has "
                             f"{shutil.disk_usage(tmp).free / 1e9:.1f} GB: set TMPDIR to a larger disk")
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
