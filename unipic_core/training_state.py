"""Resumable GRPO checkpoints: one file with the raw adapter, AdamW state, step and history, written atomically.

The RNG needs no state of its own: every random draw of a step comes from generators seeded by
(seed, step, image index), so the step number and the seed (in the settings) are the RNG state.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .lora import LoRAError, atomic_write

# Settings that change what the adapter is; resuming under other values would silently train something else.
STRUCTURAL = ("lora_rank", "lora_alpha")


@dataclass
class TrainingState:
    adapter: dict[str, torch.Tensor]  # the live adapter's raw A and B (no folded scale: resume is exact)
    optimizer: dict
    step: int
    history: list[dict]
    settings: dict
    base_model: str


def save_state(state: TrainingState, path: Path) -> None:
    """Write the checkpoint atomically; on failure the previous checkpoint is left as it was."""
    payload = {"adapter": state.adapter, "optimizer": state.optimizer,
               "step": state.step, "history": state.history, "settings": state.settings,
               "base_model": state.base_model}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), "the training checkpoint")


def load_state(path: Path) -> TrainingState:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise LoRAError(f"cannot read the training checkpoint {path}: {e}; delete it or turn resume off") from e
    return TrainingState(payload["adapter"], payload["optimizer"], payload["step"], payload["history"],
                         payload["settings"], payload["base_model"])


def check_resumable(state: TrainingState, settings, base_model: str, path: Path) -> None:
    """Refuse to resume under another base model or adapter shape, naming what differs."""
    if state.base_model != base_model:
        raise LoRAError(f"resume: {path} was trained on base model '{state.base_model}', not '{base_model}'; "
                        "load that model, or pick another LoRA name to start fresh")
    current = vars(settings)
    for key in STRUCTURAL:
        if state.settings.get(key) != current[key]:
            raise LoRAError(f"resume: {path} has {key} = {state.settings.get(key)}, but this run asks for "
                            f"{current[key]}; set {key} to {state.settings.get(key)} or pick another LoRA name")
