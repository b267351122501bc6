"""Where a GRPO run is written: its LoRA file and, beside it, its training state (training_state.py).

Refused before any training: files that exist and are not resumed -- resume off, or a LoRA without a state (saved
by hand or downloaded) -- and a folder that cannot be written. Only rank 0 writes, the state first and then the
LoRA, so a kill between the two leaves an older (or no) LoRA beside the newer state; resuming writes it again.
"""

import logging
import tempfile
from pathlib import Path
from typing import Callable

from ..models.lora import LoRAError, LoRAWeights, load_lora, save_lora
from .grpo_settings import GRPOSettings
from .training_state import TrainingState, check_resumable, load_state, save_state

log = logging.getLogger("unipic2")

STATE_SUFFIX = ".training-state"  # not a LoRA extension, so LoRA loaders do not list it


class CheckpointFiles:
    """A run's LoRA file and training state, and which finished step they hold."""

    def __init__(self, lora_file: Path, resume: bool, writer: bool):
        """resume: continue the run these files hold, if they hold a state; writer: this process writes (rank 0)."""
        self.lora_file, self.state_file = lora_file, lora_file.with_suffix(STATE_SUFFIX)
        self.resuming = resume and self.state_file.exists()
        self.writer = writer
        self.saved_step = 0  # the finished step on disk
        self._refuse_overwrite(resume)
        self._check_writable()

    def _refuse_overwrite(self, resume: bool) -> None:
        if self.resuming:
            return
        if resume and self.lora_file.exists():
            raise LoRAError(f"{self.lora_file} exists but has no training state ({self.state_file.name}) to resume: "
                            "it was saved by hand or downloaded, and is never overwritten; choose another lora_name "
                            "(to train on from that LoRA, load it and connect it to the 'lora' input)")
        existing = [path for path in (self.lora_file, self.state_file) if path.exists()]
        if existing:
            raise LoRAError(f"{existing[0]} already exists and 'resume' is off, so this run would overwrite it; turn "
                            "'resume' on to continue it, or choose another lora_name")

    def _check_writable(self) -> None:
        """A test write now, so that an unwritable folder fails before step 1, not at the first checkpoint."""
        folder = self.lora_file.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder) as probe:  # unlinked at once: nothing to clean up after a kill
                probe.write(b"0")
                probe.flush()
        except OSError as e:
            raise LoRAError(f"cannot write the LoRA into {folder} ({e}); make that folder writable or choose another "
                            "lora_name") from e

    def resumed_state(self, settings: GRPOSettings, base_model: str, fingerprint: dict) -> TrainingState | None:
        """The state to continue, refused unless it is this run's (check_resumable); None when not resuming."""
        if not self.resuming:
            return None
        state = load_state(self.state_file)
        check_resumable(state, settings, base_model, fingerprint, self.state_file)
        self.saved_step = state.step
        return state

    def rewrite_stale_lora(self, step: int, lora: Callable[[], LoRAWeights]) -> None:
        """After resuming at `step`: write the LoRA again if a kill left an older (or no) one beside the state."""
        if not self.writer:
            return
        try:
            stale = load_lora(self.lora_file).info.get("steps") != step
        except LoRAError:
            stale = True
        if stale:
            log.info("UniPic2 GRPO: %s did not hold step %d of its training state; written again", self.lora_file,
                     step)
            save_lora(lora(), self.lora_file)

    def save(self, finished: TrainingState, lora: Callable[[], LoRAWeights]) -> None:
        """Write a finished step unless it is on disk already: the state, then its LoRA."""
        if not self.writer or self.saved_step == finished.step:
            return
        save_state(finished, self.state_file)
        save_lora(lora(), self.lora_file)
        self.saved_step = finished.step

    def save_while_raising(self, error: BaseException, finished: TrainingState,
                           lora: Callable[[], LoRAWeights]) -> None:
        """Called while `error` propagates: write the last finished step; a failing write must not hide `error`."""
        try:
            self.save(finished, lora)
        except Exception as failure:
            note = f"UniPic2 GRPO: the checkpoint of step {finished.step} could not be written either: {failure}"
            log.error(note)
            if hasattr(error, "add_note"):  # Python 3.11+; the log has it either way
                error.add_note(note)
        else:
            if self.saved_step:
                log.info("UniPic2 GRPO: stopped by %s; %s holds step %d", type(error).__name__, self.lora_file,
                         self.saved_step)
