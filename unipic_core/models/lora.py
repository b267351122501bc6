"""Reward LoRAs on the Kontext DiT: the training adapter's values (on any dit.TrainableDiT), and the shareable
.safetensors file.

File format (diffusers/peft style): `transformer.<module>.lora_A.weight` [r, in] and
`transformer.<module>.lora_B.weight` [out, r], with the training scale alpha / r folded into lora_B, so that
delta_W = B @ A in every loader. diffusers' SD3 `load_lora_weights` rejects `.alpha` tensors ("all LoRA param
names must contain 'lora'"), and ComfyUI applies no scale when there is none, so a folded scale is the one form
that loads at the intended strength in both. The safetensors metadata holds diffusers' `lora_adapter_metadata`
(r, lora_alpha = r, targets) and our `unipic2` JSON: the training alpha, base model, steps, rewards, settings.
"""

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..atomic_files import atomic_write

# Flow-GRPO's SD3 targets: the attention projections of both MMDiT streams.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ADAPTER = "unipic2_grpo"
PREFIX = "transformer."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
UNIPIC2_METADATA_KEY = "unipic2"
_TENSOR_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")
_DAMAGED = "; the file is damaged or was edited by hand -- save it again from its source or get a fresh copy"

log = logging.getLogger("unipic2")


class LoRAError(ValueError):
    pass


@dataclass
class LoRAWeights:
    """UNIPIC2_LORA: the file's tensors (float32, CPU) and our metadata (rank, alpha, base_model, steps, ...)."""

    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.info["rank"])

    @property
    def alpha(self) -> float:
        return float(self.info["alpha"])

    def modules(self) -> list[str]:
        """Module names inside the transformer, e.g. 'transformer_blocks.0.attn.to_q'."""
        return sorted(k[len(PREFIX):-len(".lora_A.weight")] for k in self.tensors if k.endswith(".lora_A.weight"))

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(down A [r, in], up B [out, r]) of one module."""
        return self.tensors[f"{PREFIX}{module}.lora_A.weight"], self.tensors[f"{PREFIX}{module}.lora_B.weight"]


def lora_config(rank: int, alpha: float):
    from peft import LoraConfig

    # The peft config diffusers' load_lora_weights reads back; add_lora sets the start values itself.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES))


def add_lora(dit, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Add a trainable float32 adapter to `dit` (a dit.TrainableDiT) and return its parameters.

    A ~ N(0, 1/r) from a generator seeded with `seed` (peft's "gaussian" start), B = 0: the adapter starts as an
    exact no-op, so step 0 samples the base model, and any DiT implementation starts from the same values.
    """
    dit.add_lora(rank, alpha)
    generator = torch.Generator().manual_seed(seed)
    start = {key: (torch.randn(p.shape, generator=generator) / rank if key.endswith(".lora_A.weight")
                   else torch.zeros(p.shape))
             for key, p in sorted(dit.adapter_parameters().items())}
    set_adapter_tensors(dit, start)
    return list(dit.adapter_parameters().values())


def adapter_tensors(dit) -> dict[str, torch.Tensor]:
    """The live adapter's raw A and B under file key names, detached float32 CPU copies."""
    return {key: p.detach().float().cpu().clone() for key, p in dit.adapter_parameters().items()}


def _module(key: str) -> str:
    return key[len(PREFIX):].rpartition(".lora_")[0]


def set_adapter_tensors(dit, tensors: dict[str, torch.Tensor], *, partial: bool = False) -> list[str]:
    """Copy raw A and B (as adapter_tensors returns them) into the live adapter; returns the adapter's modules
    the tensors leave out. Everything is checked before anything is copied: a key the adapter lacks or another
    shape is refused naming the module; leaving modules out (they keep their zero start) needs `partial`, as a
    start LoRA may, while a training state holds the whole adapter."""
    targets = dit.adapter_parameters()
    for key, value in sorted(tensors.items()):
        target = targets.get(key)
        if target is None:
            raise LoRAError(f"the LoRA has {key}, which is not in the training adapter (it adapts "
                            f"{', '.join(TARGET_MODULES)} of each attention block); the LoRA was made for another "
                            "architecture -- start from a LoRA of this model")
        if target.shape != value.shape:
            raise LoRAError(f"the LoRA's {key} is {tuple(value.shape)} but the adapter's module {_module(key)} needs "
                            f"{tuple(target.shape)}; the LoRA was made for another model size -- start from a LoRA "
                            "trained on this model")
    left_out = sorted({_module(key) for key in targets} - {_module(key) for key in tensors})
    if left_out and not partial:
        raise LoRAError(f"the adapter tensors leave out {len(left_out)} of its modules (first: {left_out[0]})")
    with torch.no_grad():
        for key, value in tensors.items():
            targets[key].copy_(value)
    return left_out


def fold_scale(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Multiply every lora_B by `scale` (alpha / r to write a file, r / alpha to read one back into an adapter)."""
    return {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in tensors.items()}


def lora_weights(adapter: dict[str, torch.Tensor], rank: int, alpha: float, info: dict) -> LoRAWeights:
    """Raw adapter tensors (as adapter_tensors gives them) as a file-ready LoRAWeights (scale folded into lora_B)."""
    return LoRAWeights(fold_scale(adapter, alpha / rank), {**info, "rank": rank, "alpha": alpha})


def load_into_adapter(dit, lora: LoRAWeights, rank: int, alpha: float, *,
                      base_model: str | None = None) -> None:
    """Start a live adapter (rank, alpha) from a LoRA file: same delta_W whatever alpha the file was trained with.
    A LoRA covering only some of the adapter's modules is used with a warning (the rest start at zero); one
    trained on another base model than `base_model` (when both are known) too."""
    if lora.rank != rank:
        raise LoRAError(f"the LoRA has rank {lora.rank} but training asks for rank {rank}; set lora_rank to "
                        f"{lora.rank} or start without it")
    trained_on = lora.info.get("base_model")
    if base_model and trained_on and trained_on != base_model:
        log.warning("UniPic2 GRPO: the start LoRA was trained on '%s', not on '%s'; training continues from it",
                    trained_on, base_model)
    left_out = set_adapter_tensors(dit, fold_scale(lora.tensors, rank / alpha), partial=True)
    if left_out:
        total = len(left_out) + len(lora.modules())
        log.warning("UniPic2 GRPO: the start LoRA covers %d of the adapter's %d modules (first left out: %s); "
                    "those start at zero", len(lora.modules()), total, left_out[0])


def check_lora_fits(lora: LoRAWeights, weight_shape: Callable[[str], tuple[int, ...] | None]) -> None:
    """Refuse a LoRA whose modules the model lacks (weight_shape(module) is None), or whose A [r, in] and B [out, r]
    do not match a module's weight [out, in], naming the first: a host skips such patches with a log line and
    runs the base model."""
    missing = [module for module in lora.modules() if weight_shape(module) is None]
    if missing:
        raise LoRAError(f"{len(missing)} LoRA module(s) do not exist in this model (first: {missing[0]}); the LoRA "
                        "was made for another architecture")
    for module in lora.modules():
        down, up = lora.pair(module)
        out_features, in_features = weight_shape(module)
        if down.shape[1] != in_features or up.shape[0] != out_features or down.shape[0] != up.shape[1]:
            raise LoRAError(f"module {module}: the LoRA's A {tuple(down.shape)} and B {tuple(up.shape)} do not fit "
                            f"the model's weight ({out_features}, {in_features}), which needs A [r, {in_features}] "
                            f"and B [{out_features}, r] with one r; the LoRA was made for another model size -- use "
                            "one trained on this model")


def save_lora(lora: LoRAWeights, path: str | Path, *, replace: bool = True) -> Path:
    """Write the .safetensors atomically (parent folders created); replace=False as in atomic_write."""
    path = Path(path)
    peft_config = lora_config(lora.rank, lora.rank).to_dict()  # lora_alpha = r: the scale is already folded
    diffusers_meta = {PREFIX + k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(diffusers_meta, default=str),
                UNIPIC2_METADATA_KEY: json.dumps(lora.info)}
    tensors = {k: v.contiguous() for k, v in lora.tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "the LoRA", replace=replace)
    return path


def load_lora(path: str | Path) -> LoRAWeights:
    """Read a LoRA file written by save_lora (or any peft-style SD3 transformer LoRA with alpha or metadata).
    A file whose tensors or metadata are not a consistent LoRA is refused naming the file and what is wrong."""
    path = Path(path)
    try:
        tensors = {k: v.float() for k, v in load_file(str(path)).items()}
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"cannot read LoRA file {path}: {e}") from e
    _check_tensors(tensors, path)
    lora = LoRAWeights(tensors, _metadata_json(metadata, UNIPIC2_METADATA_KEY, path))
    peft_meta = _metadata_json(metadata, DIFFUSERS_METADATA_KEY, path)
    ranks = {lora.pair(module)[0].shape[0] for module in lora.modules()}
    lora.info.setdefault("rank", lora.pair(lora.modules()[0])[0].shape[0])
    lora.info.setdefault("alpha", lora.info["rank"])
    rank = _metadata_rank(lora.info, "rank", ranks, path)
    _metadata_number(lora.info, "alpha", path)
    # A foreign peft file may carry a scale alpha / r in diffusers' metadata; fold it like ours.
    r = _metadata_rank(peft_meta, PREFIX + "r", ranks, path) if PREFIX + "r" in peft_meta else rank
    lora_alpha = _metadata_number(peft_meta, PREFIX + "lora_alpha", path) if PREFIX + "lora_alpha" in peft_meta else r
    if lora_alpha != r:
        lora.tensors = fold_scale(lora.tensors, lora_alpha / r)
    return lora


def _check_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Only transformer.*.lora_A/B weights, each A with its B, shaped [r, in] and [out, r], all finite."""
    halves = {key: _TENSOR_KEY.fullmatch(key) for key in tensors}
    if not any(match and match[2] == "A" for match in halves.values()):
        raise LoRAError(f"{path} holds no 'transformer.*.lora_A.weight' tensors; is it a UniPic2/SD3 LoRA?")
    others = sorted(key for key, match in halves.items() if match is None)
    if others:
        raise LoRAError(f"{path} has tensors other than transformer.*.lora_A/lora_B weights (first: {others[0]}); "
                        "UniPic2 LoRAs hold only those (an '.alpha' or text-encoder LoRA is not supported here)")
    present = {(match[1], match[2]) for match in halves.values()}
    for module, half in sorted(present):
        partner = "B" if half == "A" else "A"
        if (module, partner) not in present:
            raise LoRAError(f"{path}: module {module} has lora_{half} but no lora_{partner}{_DAMAGED}")
    for module in sorted({module for module, _ in present}):
        down, up = tensors[f"{PREFIX}{module}.lora_A.weight"], tensors[f"{PREFIX}{module}.lora_B.weight"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoRAError(f"{path}: module {module} has lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)}, "
                            f"not [r, in] and [out, r] with one r{_DAMAGED}")
    for key in sorted(tensors):
        if not torch.isfinite(tensors[key]).all():
            raise LoRAError(f"{path}: {key} holds NaN or infinite values; the training that wrote it diverged (train "
                            "again with a lower learning_rate) or the file is damaged")


def _metadata_json(metadata: dict[str, str], key: str, path: Path) -> dict:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: its '{key}' metadata is not valid JSON ({e}){_DAMAGED}") from e
    if not isinstance(value, dict):
        raise LoRAError(f"{path}: its '{key}' metadata is a JSON {type(value).__name__}, not an object{_DAMAGED}")
    return value


def _metadata_number(meta: dict, key: str, path: Path, whole: bool = False) -> float:
    """meta[key] if it is a positive (whole) number, else a LoRAError naming the file and the key."""
    value, kind = meta[key], int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
        raise LoRAError(f"{path}: metadata '{key}' is {value!r}, not a positive {'whole ' if whole else ''}number"
                        f"{_DAMAGED}")
    return value


def _metadata_rank(meta: dict, key: str, ranks: set[int], path: Path) -> int:
    """The metadata's rank, which must be the tensors' rank where they have one (peft's rank_pattern gives some
    modules ranks of their own; r is then only the default)."""
    rank = _metadata_number(meta, key, path, whole=True)
    if len(ranks) == 1 and rank not in ranks:
        raise LoRAError(f"{path}: metadata '{key}' is {rank} but its tensors have rank {min(ranks)}{_DAMAGED}")
    return rank
