"""The GRPO trainer: the loop shared by the trainer node and `torchrun -m unipic_core.training.grpo_torchrun`.

Per step: draw K prompts (or edit pairs) and sample a group of G images for each, storing latents and log-probs
(training_samples.py); decode; score; group advantages; then update the LoRA on the step's loss terms
(training_losses.py: Flow-GRPO's clipped loss + beta * KL against the DiT with the LoRA disabled, or DiffusionNFT's)
with grad-norm clipping and AdamW. Which images a step makes, where, and with which random draws is
training_plan.py's; the sums over torchrun's processes are data_parallel.py's.

Nothing finished is lost: after each step the trainer keeps a CPU copy of that step's whole state (adapter,
optimizer, history, samples) until it is written (checkpoint_files.py), and writes it when anything raises during a
later step, so the checkpoint is then exactly the last finished step's. An existing LoRA is never overwritten by a
run that does not resume it.
"""

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager

import torch

from ..models.lora import LoRAWeights, adapter_tensors, add_lora, load_into_adapter, lora_weights, set_adapter_tensors
from ..rewards import Reward
from .checkpoint_files import CheckpointFiles
from .data_parallel import gather_scores, rank_and_world, sum_gradients
from .grpo import group_advantages, trained_steps
from .grpo_settings import GRPOSettings
from .nft import follow, old_policy_decay
from .training_data import TrainingItem, check_reward_inputs
from .training_losses import flow_grpo_terms, nft_terms
from .training_models import TrainingModels
from .training_plan import Chunk, plan_chunks, update_parts
from .training_samples import StepInputs, prepare_inputs, sample_chunks, score_chunks
from .training_state import TrainingState, check_fits, cpu_copy, run_fingerprint, unusable

log = logging.getLogger("unipic2")


@dataclass
class StepReport:
    step: int
    total_steps: int
    rewards: dict[str, tuple[float, float]]  # name -> (mean, std) over this step's images, "total" included
    loss: float
    policy_loss: float
    kl: float
    clip_fraction: float
    skipped_groups: int
    elapsed: float
    samples: torch.Tensor  # IMAGE [n, H, W, 3]: up to one group's images of this step (rank 0's)

    def history_entry(self) -> dict:
        """The step as the history (and so a checkpoint) keeps it: without its images and the run's length."""
        return {"step": self.step, "rewards": self.rewards, "loss": self.loss, "policy_loss": self.policy_loss,
                "kl": self.kl, "clip_fraction": self.clip_fraction, "skipped_groups": self.skipped_groups,
                "elapsed": self.elapsed}


@dataclass
class TrainingResult:
    lora: LoRAWeights
    history: list[dict]
    samples: torch.Tensor
    cancelled: bool


@dataclass
class Hooks:
    on_step: Callable[[StepReport], None] = lambda report: None
    cancel_requested: Callable[[], bool] = lambda: False


def kept_rewards(scores: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, tuple[float, float]]:
    """{name: (mean, std)} over the images of the groups that trained (valid [K * G]); NaN when none did."""
    rewards = {}
    for name, value in scores.items():
        kept = value[valid]
        rewards[name] = (kept.mean().item(), kept.std().item() if len(kept) > 1 else 0.0) if len(kept) \
            else (math.nan, math.nan)
    return rewards


class GRPOTrainer:
    """Holds the adapter, optimizer and history; `run` trains until settings.steps (resumable)."""

    def __init__(self, models: TrainingModels, reward: Reward, data: list[TrainingItem], settings: GRPOSettings,
                 checkpoint: Path | None = None, resume: bool = False, start_lora: LoRAWeights | None = None):
        """checkpoint: the LoRA .safetensors to write; its training state goes next to it (.training-state).

        Refused before any training: a checkpoint (LoRA or state) that exists and is not resumed -- resume off, or
        a LoRA without a state (saved by hand or downloaded) -- and a folder that cannot be written.
        resume: continue the checkpoint's run if it has a state; it must be the same run (check_resumable).
        start_lora: the LoRA a new run starts from. A resumed state already holds the adapter, so the start LoRA
        is not loaded again; it must be the one the run started from (compared by a digest of its tensors):
        the same LoRA continues -- a re-queued PDTR chain, whose first trainer returns its finished LoRA again --
        and another, an added or a removed one is refused, naming both.
        """
        settings.check()
        if not data:
            raise ValueError("the prompt list is empty; give at least one prompt (one per line) or edit pair")
        editing = [item.source is not None for item in data]
        if any(editing) and not all(editing):
            raise ValueError("mixing prompts and edit pairs in one run is not supported; train one kind per stage")
        check_reward_inputs(reward, data)
        self.models, self.reward, self.data, self.settings = models, reward, data, settings
        self.fingerprint = run_fingerprint(reward, data, start_lora)
        self.rank, self.world = rank_and_world()
        self.files = None if checkpoint is None else CheckpointFiles(checkpoint, resume, writer=self.rank == 0)
        state = None
        if self.files is not None:  # a state to resume is checked before the DiT is touched
            state = self.files.resumed_state(settings, models.base_model, self.fingerprint)
        self.dit = models.dit()
        self.params = add_lora(self.dit, settings.lora_rank, settings.lora_alpha, settings.seed)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=1e-4)  # Flow-GRPO's and DiffusionNFT's
        self.step, self.history = 0, []
        self.old_adapter: dict[str, torch.Tensor] | None = None  # diffusion-nft's old policy (raw A and B)
        try:
            if state is not None:
                self._restore(state)
            elif start_lora is not None:
                load_into_adapter(self.dit, start_lora, settings.lora_rank, settings.lora_alpha,
                                  base_model=models.base_model)
            if settings.algorithm == "diffusion-nft" and self.old_adapter is None:  # the old policy starts as the LoRA
                self.old_adapter = {name: p.detach().clone() for name, p in self.dit.adapter_parameters().items()}
            self._finished = self._snapshot(None if state is None else state.samples)
            if state is not None:
                self.files.rewrite_stale_lora(self.step, self.lora)
        except Exception:
            self.close()  # leave the shared DiT as it was
            raise

    def run(self, hooks: Hooks = Hooks()) -> TrainingResult:
        """Train to settings.steps; checkpoint every save_every steps, at the end and when cancelled.

        Whatever raises (a reward, decoding, the update, a host hook such as Cancel's), the last finished step is
        written before the error propagates. A run whose steps are already reached returns its state as it is.
        """
        cancelled = False
        try:
            while self.step < self.settings.steps:
                report = self.train_step()
                self._finished = self._snapshot(report.samples)
                hooks.on_step(report)
                every = self.settings.save_every
                if every and self.step % every == 0:
                    self.save()
                if hooks.cancel_requested():
                    cancelled = True
                    break
        except BaseException as error:
            if self.files is not None:
                self.files.save_while_raising(error, self._finished, self.lora)
            raise
        self.save()
        return TrainingResult(self.lora(), self.history, self.samples(), cancelled)

    def train_step(self, phase: Callable[[str], ContextManager] = lambda name: nullcontext()) -> StepReport:
        """One step; phase(name) wraps each part (prepare, sampling, decoding, reward, update) for benchmarks."""
        s, started = self.settings, time.monotonic()
        with phase("prepare"):
            inputs = prepare_inputs(self.models, self.data, s, self.step)
        chunks = plan_chunks(s, self.rank, self.world)
        with phase("sampling"):
            self.dit = self.models.dit()
            sample_chunks(self.dit, self.old_adapter, chunks, inputs, s, self.models.latents)
        with phase("decoding"):
            for chunk in chunks:
                chunk.images = self.models.decode(chunk.trajectory.final)
        with phase("reward"):
            # every rank's scores: the advantages compare each image with its whole group
            scores = gather_scores(score_chunks(self.reward, chunks, inputs), self.models.device, self.world)
        advantages, valid, skipped = self._advantages(scores["total"])
        with phase("update"):
            self.dit = self.models.dit()  # the reward may have moved it off the device
            with self.dit.checkpointing() if s.gradient_checkpointing else nullcontext():
                losses = self._update(chunks, inputs, advantages, valid)
        self.step += 1
        report = StepReport(self.step, s.steps, kept_rewards(scores, valid), losses["loss"], losses["policy"],
                            losses["kl"], losses["clip"], skipped, time.monotonic() - started, chunks[0].images)
        self.history.append(report.history_entry())
        return report

    def _advantages(self, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The step's group advantages [K * G] from its total rewards [K * G], which images train (valid [K * G])
        and how many groups are skipped: a group with a non-finite reward gets advantages 0 and no gradient."""
        s = self.settings
        groups = total.reshape(-1, s.group_size)
        finite = torch.isfinite(groups).all(dim=1)
        valid = finite.repeat_interleave(s.group_size)
        skipped = int((~finite).sum().item())
        if skipped:
            log.warning("UniPic2 GRPO step %d: %d group(s) got a non-finite reward and are skipped",
                        self.step + 1, skipped)
        advantages = torch.zeros_like(groups)
        if finite.any():  # advantages over the kept groups only (the batch std must not see skipped ones)
            kept = group_advantages(groups[finite].reshape(-1), s.group_size, s.batch_std, s.advantage_clip)
            advantages[finite] = kept.reshape(-1, s.group_size)
        return advantages.reshape(-1), valid, skipped

    def _update(self, chunks: list[Chunk], inputs: StepInputs, advantages: torch.Tensor, valid: torch.Tensor) -> dict:
        """The update: the step's images in `updates_per_step` parts (Flow-GRPO: two, so the second update sees
        ratios != 1 and the clip acts), each part's gradient summed over its images and loss terms (trained steps,
        or NFT's training points) and averaged over all ranks, then grad-norm clipping and one AdamW step; then
        diffusion-nft's old policy follows the LoRA."""
        s = self.settings
        if s.algorithm == "diffusion-nft":
            count = len(trained_steps(s.sampling_steps, s.timestep_fraction))
            terms_of = partial(nft_terms, self.dit, self.old_adapter, s, inputs, count)
        else:
            steps = (trained_steps(s.sampling_steps, s.timestep_fraction) if s.algorithm == "flow-grpo"
                     else chunks[0].trajectory.steps)
            count = len(steps)
            terms_of = partial(flow_grpo_terms, self.dit, s, inputs, steps)
        sums, terms_count = {"loss": 0.0, "policy": 0.0, "kl": 0.0, "clip": 0.0}, 0
        for part_images, part in update_parts(chunks, valid, s.updates_per_step):
            for chunk, rows in part:
                piece_advantages = advantages[[chunk.indices[r] for r in rows]].to(self.models.device)
                for terms in terms_of(chunk, rows, piece_advantages):
                    # Weighted so the summed gradient is the part's mean over images and terms of all ranks.
                    (terms.loss * len(rows) / (part_images * count)).backward()
                    sums["loss"] += terms.loss.item(); sums["policy"] += terms.policy.item()
                    sums["kl"] += terms.kl.item(); sums["clip"] += terms.clip_fraction.item()
                    terms_count += 1
            sum_gradients(self.params, self.world)
            if part_images:
                torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.old_adapter is not None:
            decay = old_policy_decay((self.step + 1) * s.updates_per_step)
            self.old_adapter = follow(self.old_adapter, self.dit.adapter_parameters(), decay)
        return {k: v / max(terms_count, 1) for k, v in sums.items()}

    # --- the run's state: resuming, the last finished step, writing it ---------------------------------------

    def _restore(self, state: TrainingState) -> None:
        check_fits(state, self.optimizer, self.dit.adapter_parameters(), self.files.state_file)
        set_adapter_tensors(self.dit, state.adapter)
        try:
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise unusable(self.files.state_file, f"its optimizer state does not load ({e})") from e
        for group in self.optimizer.param_groups:  # the run's learning rate, not the checkpoint's
            group["lr"] = self.settings.learning_rate
        self.step, self.history = state.step, list(state.history)
        if self.settings.algorithm == "diffusion-nft":
            if state.old_adapter is None or set(state.old_adapter) != set(state.adapter):
                raise unusable(self.files.state_file, "it holds no old policy for diffusion-nft")
            live = self.dit.adapter_parameters()
            self.old_adapter = {name: t.to(live[name]) for name, t in state.old_adapter.items()}
        log.info("UniPic2 GRPO: resumed %s at step %d", self.files.state_file, self.step)

    def _snapshot(self, samples: torch.Tensor | None) -> TrainingState:
        """The current (finished) step's whole state as CPU copies; samples IMAGE [n, H, W, 3] kept as uint8."""
        if samples is not None and samples.dtype != torch.uint8:
            samples = (samples.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        return TrainingState(adapter_tensors(self.dit), cpu_copy(self.optimizer.state_dict()), self.step,
                             list(self.history), asdict(self.settings), self.models.base_model, self.fingerprint,
                             samples, cpu_copy(self.old_adapter))

    def lora(self) -> LoRAWeights:
        """The last finished step's LoRA, file-ready (scale alpha / r folded into lora_B)."""
        s, finished = self.settings, self._finished
        info = {"base_model": self.models.base_model, "steps": finished.step, "rewards": self.reward.names,
                "settings": asdict(s), "format": "unipic2-grpo-lora"}
        return lora_weights(finished.adapter, s.lora_rank, s.lora_alpha, info)

    def samples(self) -> torch.Tensor:
        """IMAGE [n, H, W, 3]: the last finished step's samples (black for a state from before they were kept)."""
        if self._finished.samples is None:
            return torch.zeros(1, 64, 64, 3)
        return self._finished.samples.float() / 255

    def save(self) -> None:
        """Write the last finished step unless it is on disk already: the state, then the LoRA."""
        if self.files is not None:
            self.files.save(self._finished, self.lora)

    def close(self) -> None:
        """Remove the adapter from the (shared, cached) DiT."""
        self.dit.remove_lora()
