"""What the benchmarks share: time and peak memory of a call, legs compared in turn, ratios to a reference, the
command line every benchmark has, random-weight SD3.5-Medium parts, and ComfyUI imported into the process.

Imported by the benchmarks as `benchmarks.harness` (they run as `python -m benchmarks.NAME` from the repository
root). Peak memory is CUDA's max_memory_allocated on a GPU, and on the CPU the growth of the process RSS (sampled every
2 ms, after returning freed heap to the OS with malloc_trim).
"""

import argparse
import asyncio
import ctypes
import gc
import sys
import threading
import time

import psutil
import torch

from tools.comfyui_runner import PACK_NAME, prepare_host
from unipic_core.inference.sampling import PromptEmbeds
from unipic_core.models.kontext_transformer import KontextSD3Transformer
from unipic_core.tiny import SD35M_TRANSFORMER


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


def timed(device: torch.device, fn, *args, **kwargs):
    """(fn's result, its seconds), the GPU's queued work included."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def measure(fn, device) -> tuple[float, float]:
    """(seconds, peak MiB) of one call."""
    with PeakMemory(device) as memory:
        _, seconds = timed(device, fn)
    return seconds, memory.peak


def compare(legs: dict, device, repeats=5) -> dict:
    """{name: (seconds, MiB)} for {name: fn}: runs alternate after one warm-up each, so a slow spell on a noisy
    machine hits every leg; the lowest of the repeats is kept for each figure."""
    for fn in legs.values():
        fn()
    runs = {name: [] for name in legs}
    for _ in range(repeats):
        for name, fn in legs.items():
            runs[name].append(measure(fn, device))
    return {name: (min(t for t, _ in r), min(m for _, m in r)) for name, r in runs.items()}


def ratios(figures: tuple[float, float], reference: tuple[float, float], digits: int = 3) -> str:
    """'time T memory M': (seconds, MiB) over the reference's; a reference that took no memory counts as 1e-6 MiB."""
    (t, m), (t_ref, m_ref) = figures, reference
    return f"time {t / t_ref:.{digits}f} memory {m / max(m_ref, 1e-6):.{digits}f}"


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every benchmark has: its docstring's first paragraph, --sizes and --device."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["tiny", "mid"], help="tiny checkpoint configs to run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def full_size_dit(device: torch.device) -> KontextSD3Transformer:
    """SD3.5-Medium's DiT (UniPic2-SD3.5M-Kontext-2B's config) with random weights, as speed does not depend on them;
    bf16 on a GPU, as the real model runs, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return KontextSD3Transformer(**SD35M_TRANSFORMER).to(device, dtype).eval()


def random_prompt_embeds(config, generator: torch.Generator, tokens: int = 333) -> list[PromptEmbeds]:
    """[positive, negative]: random stand-ins for the text encoders' output, shaped for the DiT's `config`
    ([1, tokens, joint_attention_dim] and [1, pooled_projection_dim]; 333 = CLIP's 77 + T5's 256), on the CPU."""
    return [PromptEmbeds(torch.randn(1, tokens, config.joint_attention_dim, generator=generator),
                         torch.randn(1, config.pooled_projection_dim, generator=generator)) for _ in "pn"]


class NativeHost:
    """ComfyUI imported into this process with the pack loaded as ComfyUI loads it (the tests' host)."""

    def __init__(self, work_dir: str, device: torch.device, pytorch_attention: bool):
        host = prepare_host(work_dir)
        sys.path.insert(0, str(host))  # first: ComfyUI's `nodes` module, not the repository's `nodes` package
        import comfy.cli_args

        # before comfy.model_management is first imported, which reads them
        comfy.cli_args.args.cpu = device.type == "cpu"
        comfy.cli_args.args.use_pytorch_cross_attention = pytorch_attention
        import comfy.ldm.modules.attention
        import nodes

        pack_dir = host / "custom_nodes" / PACK_NAME
        if asyncio.run(nodes.load_custom_node(str(pack_dir))) is False:
            raise SystemExit("the pack failed to import into ComfyUI (see the log above)")
        pack = next(m for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) == str(pack_dir / "__init__.py"))
        self.pack, self.nodes = pack, nodes
        self.with_kontext_reference = pack.nodes.host.native_kontext.with_kontext_reference
        self.attention = comfy.ldm.modules.attention.optimized_attention.__name__

    def node(self, name: str):
        """An instance of the node class ComfyUI registered under `name` (the pack's or its own)."""
        return self.nodes.NODE_CLASS_MAPPINGS[name]()

    def model(self, transformer, dtype):
        """The DiT's weights as a native MODEL (Load Diffusion Model's loader), patched to edit as UniPic2-Kontext."""
        import comfy.sd

        state_dict = {k: v.clone() for k, v in transformer.state_dict().items()}  # the loader consumes its input
        native = comfy.sd.load_diffusion_model_state_dict(state_dict, model_options={"dtype": dtype})
        return self.with_kontext_reference(native)
