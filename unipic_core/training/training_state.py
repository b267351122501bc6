"""Resumable GRPO checkpoints: one file with the raw adapter, AdamW state, step, history, the run's fingerprint
and the last step's samples, written atomically.

The RNG needs no state of its own: every random draw of a step comes from generators seeded by
(seed, step, image index), so the step number and the seed (in the settings) are the RNG state.

A resume must continue the same run. The settings record the seed and the algorithm; the fingerprint records
what the settings cannot: the reward terms (names, weights, details such as a colour target), a digest of the
prompts / edit pairs (with the source images' pixels) and of the start LoRA. Resuming under another base model,
fingerprint or setting is refused naming what changed, except the settings in FREE (they change memory use or
how often checkpoints are written, not what is learned) and the learning rate (the run's wins, logged).
States written before fingerprints existed resume with a warning that reward, data and start LoRA are unchecked.
"""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_files import atomic_write
from ..models.lora import LoRAError, LoRAWeights

log = logging.getLogger("unipic2")

FREE = ("steps", "save_every", "micro_batch", "gradient_checkpointing")
LOGGED = ("learning_rate",)
FIX = ("delete it and its LoRA (.safetensors, or move that away) to start that lora_name afresh, or choose "
       "another lora_name")
# Fingerprint entry -> (what it is, how to get it back)
FINGERPRINT = {"rewards": ("the reward", "connect the checkpoint's reward (same terms and weights) again"),
               "data": ("the training data", "give the checkpoint's prompts / edit pairs again, in the same order"),
               "start_lora": ("the start LoRA ('lora' input)", "connect the LoRA the run started from (or none)")}
FIELDS = {"adapter": dict, "optimizer": dict, "step": int, "history": list, "settings": dict, "base_model": str}


@dataclass
class TrainingState:
    adapter: dict[str, torch.Tensor]  # the live adapter's raw A and B (no folded scale: resume is exact)
    optimizer: dict
    step: int
    history: list[dict]
    settings: dict
    base_model: str
    run: dict[str, list[str] | str] | None = None  # fingerprint (see run_fingerprint); None in older states
    samples: torch.Tensor | None = None  # the last step's images, uint8 [n, H, W, 3]
    old_adapter: dict[str, torch.Tensor] | None = None  # diffusion-nft's old policy, raw A and B like `adapter`


def data_fingerprint(items) -> str:
    """'<n> prompts|edit pairs, sha256 <digest>' over the prompts in order (with their GenEval-style requirements)
    and the edit sources' pixels."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.prompt.encode() + b"\0")
        if item.metadata is not None:  # plain prompts hash as before, so their runs still resume
            digest.update(item.metadata.to_json().encode() + b"\0")
        if item.source is not None:  # as 8-bit pixels: an upstream node's float noise is not another image
            source = (item.source.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
            digest.update(f"{tuple(source.shape)}".encode() + source.numpy().tobytes())
    kind = "edit pairs" if items and items[0].source is not None else "prompts"
    return f"{len(items)} {kind}, sha256 {digest.hexdigest()[:16]}"


def lora_fingerprint(lora: LoRAWeights | None) -> str:
    """'none', or 'rank r, sha256 <digest of every tensor>'."""
    if lora is None:
        return "none"
    digest = hashlib.sha256()
    for key in sorted(lora.tensors):
        digest.update(key.encode() + b"\0" + lora.tensors[key].detach().float().cpu().contiguous().numpy().tobytes())
    return f"rank {lora.rank}, sha256 {digest.hexdigest()[:16]}"


def run_fingerprint(reward, data, start_lora: LoRAWeights | None) -> dict:
    return {"rewards": reward.fingerprint, "data": data_fingerprint(data), "start_lora": lora_fingerprint(start_lora)}


def cpu_copy(value):
    """A deep copy with every tensor cloned to the CPU (an optimizer state_dict holds the live tensors)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_copy(v) for v in value)
    return value


def save_state(state: TrainingState, path: Path) -> None:
    """Write the checkpoint atomically; on failure the previous checkpoint is left as it was."""
    payload = {"adapter": state.adapter, "optimizer": state.optimizer, "step": state.step, "history": state.history,
               "settings": state.settings, "base_model": state.base_model, "run": state.run, "samples": state.samples,
               "old_adapter": state.old_adapter}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), "the training checkpoint")


def unusable(path: Path, problem: str) -> LoRAError:
    return LoRAError(f"the training checkpoint {path} is not usable: {problem}; {FIX}")


def load_state(path: Path) -> TrainingState:
    """Read and check a checkpoint; anything malformed is a LoRAError naming the file and what is wrong."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise unusable(path, f"it cannot be read ({e})") from e
    problem = payload_problem(payload)
    if problem:
        raise unusable(path, problem)
    return TrainingState(**{key: payload[key] for key in FIELDS}, run=payload.get("run"),
                         samples=payload.get("samples"), old_adapter=payload.get("old_adapter"))


def payload_problem(payload) -> str | None:
    """What makes a loaded checkpoint unusable, or None."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a training state"
    for key, kind in FIELDS.items():
        if key not in payload:
            return f"'{key}' is missing"
        if not isinstance(payload[key], kind) or isinstance(payload[key], bool):
            return f"'{key}' is {type(payload[key]).__name__}, expected {kind.__name__}"
    for key in ("adapter", "old_adapter"):
        tensors = payload.get(key) or {}
        if not (isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in tensors.items())):
            return f"'{key}' holds something other than named tensors"
    optimizer = payload["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        return "'optimizer' is not an optimizer state (no 'state' and 'param_groups')"
    history, step = payload["history"], payload["step"]
    if len(history) != step:
        return f"'history' has {len(history)} entries for {step} steps"
    for i, entry in enumerate(history):
        if not (isinstance(entry, dict) and isinstance(entry.get("rewards"), dict)
                and all(isinstance(v, (list, tuple)) and len(v) == 2 for v in entry["rewards"].values())
                and all(isinstance(entry.get(k), (int, float)) for k in ("step", "loss", "kl"))):
            return f"history entry {i + 1} is not a step record (step, rewards, loss, kl)"
    run = payload.get("run")
    if run is not None and not (isinstance(run, dict) and set(run) == set(FINGERPRINT)
                                and isinstance(run["rewards"], list) and all(isinstance(s, str) for s in run["rewards"])
                                and isinstance(run["data"], str) and isinstance(run["start_lora"], str)):
        return "'run' is not a run fingerprint (rewards, data, start_lora)"
    samples = payload.get("samples")
    if samples is not None and not (isinstance(samples, torch.Tensor) and samples.dtype == torch.uint8
                                    and samples.dim() == 4 and samples.shape[-1] == 3):
        return "'samples' is not a uint8 image batch [n, H, W, 3]"
    return None


def check_resumable(state: TrainingState, settings, base_model: str, fingerprint: dict, path: Path) -> None:
    """Refuse to resume another run: base model, fingerprint or a setting that decides what is learned differs."""
    if state.base_model != base_model:
        raise LoRAError(f"resume: {path} was trained on base model '{state.base_model}', not '{base_model}'; "
                        "load that model, or pick another LoRA name to start fresh")
    if state.run is None:
        log.warning("UniPic2 GRPO: %s predates run fingerprints; resuming without checking that reward, data and "
                    "start LoRA are the run's (the start LoRA input is not used)", path)
    else:
        for key, (what, fix) in FINGERPRINT.items():
            if state.run[key] != fingerprint[key]:
                raise LoRAError(f"resume: {path} was trained with {what} {state.run[key]}, but this run has "
                                f"{fingerprint[key]}; {fix}, or choose another lora_name to train a new LoRA")
    current = vars(settings)
    # a setting the state predates ran at the value it had then: the default
    recorded = {**vars(type(settings)()), **state.settings}
    for key, old in recorded.items():
        if key in FREE or key not in current or current[key] == old:
            continue
        if key in LOGGED:
            log.warning("UniPic2 GRPO: resuming %s with %s %r (the checkpoint ran with %r)", path, key, current[key],
                        old)
            continue
        raise LoRAError(f"resume: {path} has {key} = {old!r}, but this run asks for {current[key]!r}; set {key} "
                        f"back to {old!r}, or choose another lora_name to train a new LoRA")


def check_fits(state: TrainingState, optimizer: torch.optim.Optimizer, adapter: dict[str, torch.Tensor],
               path: Path) -> None:
    """The state's adapter and optimizer state must match the live ones key for key and shape for shape."""
    missing = sorted(set(adapter) - set(state.adapter))
    unknown = sorted(set(state.adapter) - set(adapter))
    reshaped = sorted(k for k in set(adapter) & set(state.adapter) if state.adapter[k].shape != adapter[k].shape)
    for problem, keys in (("lacks", missing), ("has unknown", unknown), ("has reshaped", reshaped)):
        if keys:
            raise unusable(path, f"its adapter {problem} tensors for this model ({len(keys)}, e.g. {keys[0]})")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state.optimizer["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups) or \
            [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise unusable(path, f"its optimizer state is not for this adapter's {len(params)} tensors")
    for index, entry in state.optimizer["state"].items():
        moments = [v for k, v in entry.items() if k != "step"] if isinstance(entry, dict) else [None]
        if not (isinstance(index, int) and 0 <= index < len(params)) or \
                not all(isinstance(v, torch.Tensor) and v.shape == params[index].shape for v in moments):
            raise unusable(path, f"its optimizer state entry {index} does not fit the adapter")
