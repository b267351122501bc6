"""Reward LoRAs on the Kontext DiT: peft adapters for training, and the shareable .safetensors file.

File format (diffusers/peft style): `transformer.<module>.lora_A.weight` [r, in] and
`transformer.<module>.lora_B.weight` [out, r], with the training scale alpha / r folded into lora_B, so that
delta_W = B @ A in every loader. diffusers' SD3 `load_lora_weights` rejects `.alpha` tensors ("all LoRA param
names must contain 'lora'"), and ComfyUI applies no scale when there is none, so a folded scale is the one form
that loads at the intended strength in both. The safetensors metadata holds diffusers' `lora_adapter_metadata`
(r, lora_alpha = r, targets) and our `unipic2` JSON: the training alpha, base model, steps, rewards, settings.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

# Flow-GRPO's SD3 targets: the attention projections of both MMDiT streams.
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ADAPTER = "unipic2_grpo"
PREFIX = "transformer."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
UNIPIC2_METADATA_KEY = "unipic2"


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

    # Gaussian A and zero B: the adapter starts as an exact no-op, so step 0 samples the base model.
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES))


def add_lora(transformer, rank: int, alpha: float, seed: int) -> list[torch.nn.Parameter]:
    """Inject a trainable float32 adapter into `transformer` (in place); returns its parameters."""
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(lora_config(rank, alpha), adapter_name=ADAPTER)
    params = [p for n, p in transformer.named_parameters() if f".{ADAPTER}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def remove_lora(transformer) -> None:
    """Take the adapter out again, restoring the original module tree (and ModelPatcher weight keys)."""
    transformer.unload_lora()


def adapter_tensors(transformer) -> dict[str, torch.Tensor]:
    """The live adapter's raw A and B under file key names, detached float32 CPU copies."""
    out = {}
    for name, p in transformer.named_parameters():
        if f".{ADAPTER}." in name:
            out[PREFIX + name.replace(f".{ADAPTER}", "")] = p.detach().float().cpu().clone()
    return out


def set_adapter_tensors(transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy raw A and B (as adapter_tensors returns them) into the live adapter."""
    params = dict(transformer.named_parameters())
    for key, value in tensors.items():
        module, _, kind = key[len(PREFIX):].rpartition(".lora_")
        target = params.get(f"{module}.lora_{kind[0]}.{ADAPTER}.weight")
        if target is None or target.shape != value.shape:
            raise LoRAError(f"LoRA tensor {key} {tuple(value.shape)} does not fit this model's adapter")
        with torch.no_grad():
            target.copy_(value)


def fold_scale(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Multiply every lora_B by `scale` (alpha / r to write a file, r / alpha to read one back into an adapter)."""
    return {k: v * scale if k.endswith(".lora_B.weight") else v for k, v in tensors.items()}


def lora_weights(transformer, rank: int, alpha: float, info: dict) -> LoRAWeights:
    """Snapshot the live adapter as a file-ready LoRAWeights (scale folded into lora_B)."""
    return LoRAWeights(fold_scale(adapter_tensors(transformer), alpha / rank), {**info, "rank": rank, "alpha": alpha})


def load_into_adapter(transformer, lora: LoRAWeights, rank: int, alpha: float) -> None:
    """Start a live adapter (rank, alpha) from a LoRA file: same delta_W whatever alpha the file was trained with."""
    if lora.rank != rank:
        raise LoRAError(f"the LoRA has rank {lora.rank} but training asks for rank {rank}; set lora_rank to "
                        f"{lora.rank} or start without it")
    set_adapter_tensors(transformer, fold_scale(lora.tensors, rank / alpha))


def atomic_write(path: Path, write, what: str) -> None:
    """write(tmp_path) then rename over `path` (parent folders created). A failure (disk full, unwritable folder)
    raises a LoRAError naming `what` and `path`, and leaves any previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise LoRAError(f"could not write {what} to {path} ({e}); free disk space or choose a writable folder -- "
                        "any previous file there is unchanged") from e
    finally:
        tmp.unlink(missing_ok=True)


def save_lora(lora: LoRAWeights, path: str | Path) -> Path:
    """Write the .safetensors atomically (parent folders created)."""
    path = Path(path)
    peft_config = lora_config(lora.rank, lora.rank).to_dict()  # lora_alpha = r: the scale is already folded
    diffusers_meta = {PREFIX + k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(diffusers_meta, default=str),
                UNIPIC2_METADATA_KEY: json.dumps(lora.info)}
    tensors = {k: v.contiguous() for k, v in lora.tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "the LoRA")
    return path


def load_lora(path: str | Path) -> LoRAWeights:
    """Read a LoRA file written by save_lora (or any peft-style SD3 transformer LoRA with alpha or metadata)."""
    path = Path(path)
    try:
        tensors = {k: v.float() for k, v in load_file(str(path)).items()}
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"cannot read LoRA file {path}: {e}") from e
    lora = LoRAWeights(tensors, json.loads(metadata.get(UNIPIC2_METADATA_KEY, "{}")))
    if not lora.modules():
        raise LoRAError(f"{path} holds no 'transformer.*.lora_A.weight' tensors; is it a UniPic2/SD3 LoRA?")
    if set(tensors) != {f"{PREFIX}{m}.lora_{ab}.weight" for m in lora.modules() for ab in "AB"}:
        raise LoRAError(f"{path} has tensors other than transformer.*.lora_A/lora_B weights; UniPic2 LoRAs hold "
                        "only those (an '.alpha' or text-encoder LoRA is not supported here)")
    lora.info.setdefault("rank", lora.pair(lora.modules()[0])[0].shape[0])
    # A foreign peft file may carry a scale alpha / r in diffusers' metadata; fold it like ours.
    peft_meta = json.loads(metadata.get(DIFFUSERS_METADATA_KEY, "{}"))
    foreign_scale = peft_meta.get(PREFIX + "lora_alpha", lora.rank) / peft_meta.get(PREFIX + "r", lora.rank)
    if foreign_scale != 1:
        lora.tensors = fold_scale(lora.tensors, foreign_scale)
    lora.info.setdefault("alpha", lora.rank)
    return lora
