"""Loaders: a checkpoint folder (or official repo id) -> native MODEL and VAE plus the pack's text encoders / MLLM,
cached by (folders, dtype)."""

from pathlib import Path

import torch

from ..unipic_core.models.folders import find_qwen_inside, is_kontext_folder, is_metaquery_folder, is_qwen25vl_folder
from ..unipic_core.models.repos import KONTEXT_REPOS, METAQUERY_REPOS, QWEN_REPO
from .host import folders, memory
from .host.bundles import UniPic2MLLM, UniPic2Text

INSIDE = "(inside the checkpoint)"
# Load Diffusion Model's weight_dtype choices, plus plain precisions for the whole checkpoint.
DIT_OPTIONS = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
    "bf16": {"dtype": torch.bfloat16},
    "fp16": {"dtype": torch.float16},
    "fp32": {"dtype": torch.float32},
}
DTYPE_INPUT = (list(DIT_OPTIONS), {"default": "default", "tooltip": (
    "Weight precision, as Load Diffusion Model's weight_dtype. default: ComfyUI picks for the DiT and VAE (bf16 or "
    "fp16 on GPUs, fp32 on the CPU), the text encoders / MLLM use bf16 where supported, fp16 on other GPUs, fp32 on "
    "the CPU. fp8_e4m3fn / fp8_e5m2: the DiT's weights stored in fp8 (half the memory of bf16; computed in bf16/"
    "fp16); fp8_e4m3fn_fast also computes in fp8 on GPUs that support it (faster, slightly less exact). fp8 here "
    "is for the DiT: the text encoders / MLLM and VAE load as with default (MetaQuery's mllm_weights stores the "
    "MLLM in fp8). bf16 / fp16 / fp32: that precision "
    "for the DiT and the text encoders / MLLM; the VAE uses fp32 with fp32, ComfyUI's choice otherwise.")})
MLLM_WEIGHTS = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn}  # the MLLM's weight storage
_CACHE: dict[tuple, tuple] = {}  # (kind, folders, dtype) -> node outputs; the most recent load only


def encoder_dtype(choice: str) -> torch.dtype:
    """The text encoders' / MLLM's precision for a dtype choice (fp8 is for the DiT only)."""
    return memory.pick_dtype(choice if choice in memory.DTYPES else "auto")


def native_dit_and_vae(folder: Path, choice: str):
    """The folder's DiT as a native MODEL (Kontext reference ability, the checkpoint's shift) and its native VAE."""
    from ..unipic_core.models.loading import load_scheduler_config
    from .host.native_loading import load_native_dit, load_native_vae

    model = load_native_dit(folder, load_scheduler_config(folder), DIT_OPTIONS[choice])
    return model, load_native_vae(folder, torch.float32 if choice == "fp32" else None)


def kontext_folders() -> dict[str, Path]:
    return folders.local_folders(("unipic2", "diffusers"), lambda p, kind: is_kontext_folder(p, kind == "diffusers"))


def metaquery_folders() -> dict[str, Path]:
    return folders.local_folders(("unipic2", "diffusers"), lambda p, kind: is_metaquery_folder(p))


def qwen_choices() -> dict[str, Path]:
    """Qwen2.5-VL folders in models/unipic2 and models/LLM, and single files in models/text_encoders (Qwen-Image's
    text encoder is this MLLM: no second copy needed)."""
    from ..unipic_core.models.qwen25vl import is_qwen25vl_file

    found = folders.local_folders(("unipic2", "LLM"), lambda p, kind: is_qwen25vl_folder(p))
    found.update({f"text_encoders/{name}": path for name, path in folders.text_encoder_files().items()
                  if is_qwen25vl_file(path)})
    return found


class LoadUniPic2Kontext:
    CATEGORY = "UniPic2/loaders"
    DESCRIPTION = ("Loads a UniPic2-SD3.5M-Kontext checkpoint (diffusers layout) for text-to-image and editing: the DiT "
                   "as a native MODEL (ComfyUI's SD3 model with UniPic2's reference-image ability and the checkpoint's "
                   "shift, so KSampler, LoRA loaders and model patches work), the pack's exact text encoders, and "
                   "the native VAE for VAE Encode / VAE Decode.")
    RETURN_TYPES = ("MODEL", "UNIPIC2_TEXT", "VAE")
    RETURN_NAMES = ("model", "text_encoders", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(kontext_folders()) + list(KONTEXT_REPOS), {"tooltip": "A folder in models/unipic2 "
                           "(or a UniPic2 folder in models/diffusers), or an official repo id, downloaded on first use."}),
            "dtype": DTYPE_INPUT,
        }}

    def load(self, checkpoint, dtype):
        folder = folders.resolve(checkpoint, kontext_folders(), KONTEXT_REPOS, "checkpoint")
        key = ("kontext", str(folder.resolve()), dtype)
        return memory.cached(key, lambda: self._load(folder, dtype), _CACHE)

    @staticmethod
    def _load(folder: Path, choice: str):
        from ..unipic_core.models.loading import load_kontext_text_encoders

        encoders = load_kontext_text_encoders(folder, encoder_dtype(choice))
        encoders.device = memory.device()
        model, vae = native_dit_and_vae(folder, choice)
        return model, UniPic2Text(encoders, [memory.wrap(m) for m in encoders.modules()]), vae


class LoadUniPic2MetaQuery:
    CATEGORY = "UniPic2/loaders"
    DESCRIPTION = ("Loads UniPic2-MetaQuery: Qwen2.5-VL-7B + connector conditioning the Kontext DiT, for generation, "
                   "editing and image understanding. The 7B MLLM (16.6 GB in bf16, ~9.4 GB with fp8 weights) loads "
                   "partially when VRAM is short: what does not fit streams from RAM as it runs.")
    RETURN_TYPES = ("MODEL", "UNIPIC2_MLLM", "VAE")
    RETURN_NAMES = ("model", "mllm", "vae")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "checkpoint": (sorted(metaquery_folders()) + list(METAQUERY_REPOS), {"tooltip": "A MetaQuery folder "
                           "(transformer/, vae/, scheduler/, conditioner/) in models/unipic2, or an official repo id."}),
            "mllm": ([INSIDE] + sorted(qwen_choices()) + [QWEN_REPO], {"tooltip": "Qwen2.5-VL-7B-Instruct: the folder "
                     "inside the checkpoint, one in models/unipic2 or models/LLM, the repo id, or the single file in "
                     "models/text_encoders that Qwen-Image uses (qwen_2.5_vl_7b.safetensors; it may lack the output "
                     "layer that Understand and the Judge reward need)."}),
            "dtype": DTYPE_INPUT,
        }, "optional": {
            "mllm_weights": (list(MLLM_WEIGHTS), {"default": "default", "tooltip": (
                "default: the MLLM in the text-encoder precision that 'dtype' gives (bf16 for the 7B: ~16.6 GB). "
                "fp8_e4m3fn: its Linear weights stored in fp8 with a scale per layer (~9.4 GB for the 7B), turned "
                "back into that precision layer by layer as it runs: slightly less exact. Either way ComfyUI loads "
                "only what fits in VRAM and streams the rest. An fp8_scaled file is fp8 already.")}),
        }}

    def load(self, checkpoint, mllm, dtype, mllm_weights="default"):
        folder = folders.resolve(checkpoint, metaquery_folders(), METAQUERY_REPOS, "checkpoint")
        if mllm == INSIDE:
            qwen = find_qwen_inside(folder)
            if qwen is None:
                raise ValueError(f"UniPic2 Load MetaQuery: {folder} holds no Qwen2.5-VL folder; choose the MLLM "
                                 f"(a folder in models/LLM or models/unipic2, or {QWEN_REPO})")
        else:
            qwen = folders.resolve(mllm, qwen_choices(), (QWEN_REPO,), "MLLM")
        key = ("metaquery", str(folder.resolve()), str(qwen.resolve()), dtype, mllm_weights)
        source = f"{qwen.name}, {dtype}, mllm_weights {mllm_weights}"
        return memory.cached(key, lambda: self._load(folder, qwen, dtype, MLLM_WEIGHTS[mllm_weights], source),
                             _CACHE)

    @staticmethod
    def _load(folder: Path, qwen: Path, choice: str, mllm_storage: torch.dtype | None, source: str):
        from ..unipic_core.models.fp8_weights import quantize_linears
        from ..unipic_core.models.loading import load_metaquery_encoder

        encoder = load_metaquery_encoder(folder, qwen, encoder_dtype(choice), folders.qwen25_tokenizer_folder())
        encoder.device = memory.device()
        if mllm_storage is not None:  # the output layer stays exact: it decides Understand's words and Judge's P(yes)
            quantize_linears(encoder.mllm, mllm_storage, keep=(encoder.mllm.lm_head,))
        model, vae = native_dit_and_vae(folder, choice)
        return model, UniPic2MLLM(encoder, memory.wrap(encoder.mllm), memory.wrap(encoder.conditioner),
                                  source), vae
