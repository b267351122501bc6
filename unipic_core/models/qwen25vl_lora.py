"""A peft LoRA adapter for Qwen2.5-VL (adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained
writes it), read onto the installed transformers' module names.

peft names each weight `base_model.model.<module>.lora_A.weight` [r, in] / `.lora_B.weight` [out, r] after the
module it adapts, in the layout of the transformers that trained it: before 4.52 Qwen2.5-VL kept its language
model under `model.` and its vision tower under `visual.`; since then (and in transformers 5, ours) they sit under
`model.language_model.` and `model.visual.`. Both layouts are mapped here, explicitly; any other name is an error
naming it, so an adapter never half-applies.
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .fp8_weights import is_fp8
from .loading import CheckpointError, check_safetensors_file, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# (adapter module prefix, our module prefix): transformers >= 4.52 first, then the older layout
MODULE_PREFIXES = (
    ("model.language_model.layers.", "model.language_model.layers."),
    ("model.visual.", "model.visual."),
    ("model.layers.", "model.language_model.layers."),
    ("visual.", "model.visual."),
    ("lm_head", "lm_head"),
)
LORA_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}


@dataclass
class LinearLoraPair:
    """One adapted Linear: W' = W + alpha / r * up @ down (r = down's rows), as ComfyUI's LoRA patches compute."""

    down: torch.Tensor  # lora_A [r, in]
    up: torch.Tensor  # lora_B [out, r]
    alpha: float


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()


def module_name(adapter_key: str) -> str | None:
    """Our module name for a peft module name, or None when it names nothing Qwen2.5-VL has."""
    if not adapter_key.startswith(PEFT_PREFIX):
        return None
    name = adapter_key[len(PEFT_PREFIX):]
    for theirs, ours in MODULE_PREFIXES:
        if name == theirs or (name.startswith(theirs) and theirs.endswith(".")):
            return ours + name[len(theirs):]
    return None


def adapter_alpha(config: dict, path: Path) -> float:
    """The alpha that gives peft's scale with alpha / r: lora_alpha, or lora_alpha * sqrt(r) for rank-stabilised
    LoRA (scale lora_alpha / sqrt(r)). Variants whose maths differs are refused."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported")
    for key in ("use_dora", "alpha_pattern", "rank_pattern", "modules_to_save"):
        if config.get(key):
            raise CheckpointError(f"{path}: '{key}' is set ({config[key]!r}); this adapter variant is not supported "
                                  "(plain LoRA only)")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: no usable 'r' and 'lora_alpha' ({err}); is it a peft adapter config?") from err
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def read_qwen25vl_lora(folder: Path, model: torch.nn.Module, repo: str) -> dict[str, LinearLoraPair]:
    """{module name in `model` (a Qwen2_5_VLForConditionalGeneration): its LoRA weights} from a peft adapter
    folder, every key mapped and shape-checked; errors name the file or key and say to get `repo`."""
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"'{name}' not found in {folder} -- expected a peft LoRA adapter folder "
                                  f"({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}); download {repo} from the Hugging Face hub")
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    config = read_json(config_path)
    alpha, rank = adapter_alpha(config, config_path), int(config["r"])
    check_safetensors_file(weights_path)
    from safetensors.torch import load_file

    tensors = load_file(str(weights_path))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        name = module_name(key[:-len(suffix)]) if suffix else None
        if name is None:
            raise CheckpointError(f"{weights_path}: key '{key}' names no LoRA weight of a Qwen2.5-VL module "
                                  f"(expected {PEFT_PREFIX}<module>.lora_A/lora_B.weight); is it an adapter for "
                                  "Qwen2.5-VL-7B-Instruct?")
        parts.setdefault(name, {})[LORA_SUFFIXES[suffix]] = tensor
    weights = model.state_dict()
    lora = {}
    for name, pair in sorted(parts.items()):
        target = weights.get(f"{name}.weight")
        if target is None or target.ndim != 2:
            raise CheckpointError(f"{weights_path}: the adapter adapts '{name}', which is no Linear layer of this "
                                  "Qwen2.5-VL; is the adapter for Qwen2.5-VL-7B-Instruct?")
        if set(pair) != {"down", "up"}:
            missing = "lora_B" if "up" not in pair else "lora_A"
            raise CheckpointError(f"{weights_path}: '{name}' has no {missing} weight; download {repo} again")
        down, up = pair["down"], pair["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != rank or up.shape[1] != rank \
                or (up.shape[0], down.shape[1]) != tuple(target.shape):
            raise CheckpointError(f"{weights_path}: '{name}' has lora_A {tuple(down.shape)} and lora_B "
                                  f"{tuple(up.shape)}, which do not give rank {rank} and the layer's "
                                  f"{tuple(target.shape)}; is the adapter for Qwen2.5-VL-7B-Instruct?")
        if is_fp8(target):
            raise CheckpointError(f"EditScore: the MLLM holds fp8 weights ('{name}' is {target.dtype}: Load UniPic2 "
                                  "MetaQuery's mllm_weights fp8_e4m3fn, or an fp8 file), and a LoRA cannot patch fp8 "
                                  "weights; load it from a bf16 Qwen2.5-VL-7B-Instruct (in the node: mllm_weights "
                                  "default)")
        lora[name] = LinearLoraPair(down, up, alpha)
    if not lora:
        raise CheckpointError(f"{weights_path} holds no LoRA weights; download {repo} again")
    return lora


@contextmanager
def lora_added(model: torch.nn.Module, lora: dict[str, LinearLoraPair]):
    """Within it each adapted Linear of `model` outputs W x + alpha / r * up(down x), by forward hooks: the weights
    stay untouched, so outside it the model is exactly the unadapted one (the MetaQuery conditions with it). For
    scripts and torchrun; under ComfyUI the adapter patches the ModelPatcher's weights instead."""
    modules = dict(model.named_modules())
    handles = []

    def hook(down, up, scale):  # the adapter's term in float32, as peft computes it beside a bf16 model
        return lambda module, args, output: output + (scale * F.linear(F.linear(args[0].float(), down), up)).to(
            output.dtype)

    try:
        for name, pair in lora.items():
            down, up = (t.to(modules[name].weight.device, torch.float32) for t in (pair.down, pair.up))
            handles.append(modules[name].register_forward_hook(hook(down, up, pair.alpha / down.shape[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()
