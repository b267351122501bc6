"""The GRPO trainer's DiT on a native ComfyUI MODEL (unipic_core.models.dit.TrainableDiT): no second copy of the DiT;
and the trainer node's run of the engine's loop on it (train_lora).

The adapter lives in ModelPatcher weight wrappers on a clone of the user's MODEL: each adapted weight W becomes
W + scale * B @ A when ComfyUI casts it for a forward, so fp8 storage, partial loading and offloading work as in
sampling, and the user's MODEL stays untouched. ComfyUI fuses to_q / to_k / to_v (and add_q/k/v_proj) into one
qkv weight; its own SD3 key map (the one its LoRA loaders use) says which rows each diffusers module owns, so the
adapter keeps the LoRA file's diffusers names.
"""

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import comfy.utils
import torch

from ...unipic_core.models.dit import TrainableDiT
from ...unipic_core.models.lora import PREFIX, TARGET_MODULES, LoRAWeights
from ...unipic_core.rewards import Reward
from ...unipic_core.training.curves import plot_curves, sample_grid
from ...unipic_core.training.grpo_settings import GRPOSettings
from ...unipic_core.training.grpo_trainer import GRPOTrainer, Hooks
from ...unipic_core.training.training_models import TrainingModels, metaquery_condition, text_condition
from . import memory, messages, progress
from .bundles import UniPic2MLLM, UniPic2Text
from .native_kontext import with_kontext_reference

log = logging.getLogger("unipic2")

TRAINING_EVENT = "unipic2.grpo"  # one message per training step; web/unipic2_training.js draws it on the node


@dataclass(frozen=True)
class Target:
    """Where a diffusers module's weight lives in the native MMDiT: rows [start, start + out) of `key`."""

    key: str
    start: int
    shape: tuple[int, int]  # (out, in) of the diffusers module


def lora_targets(model, adapted: tuple[str, ...] | None = TARGET_MODULES) -> dict[str, Target]:
    """Diffusers module name ('transformer_blocks.0.attn.to_q') -> Target, for the modules the training adapter
    adapts (lora.TARGET_MODULES, matched by name suffix as peft matches them), or for every weight (None)."""
    native = model.model
    targets = {}
    for name, place in comfy.utils.mmdit_to_diffusers(native.model_config.unet_config,
                                                      output_prefix="diffusion_model.").items():
        module = name.removesuffix(".weight")
        if module == name or adapted and not any(module == t or module.endswith("." + t) for t in adapted):
            continue
        if isinstance(place, tuple) and len(place) > 2:  # a re-arranged weight (adaLN): no LoRA target
            continue
        key, rows = (place, None) if isinstance(place, str) else place
        try:
            weight = comfy.utils.get_attr(native, key)
        except AttributeError:  # the map is generic: the last block's context stream has no output projection
            continue
        if weight.ndim != 2:  # LoRAs adapt linear layers
            continue
        start, out = (0, weight.shape[0]) if rows is None else rows[1:]
        targets[module] = Target(key, start, (out, weight.shape[1]))
    return targets


class LoRADelta:
    """A ModelPatcher weight wrapper: W + scale * B @ A on the rows each adapted module owns (none while off)."""

    def __init__(self, pieces: list[tuple[int, torch.nn.Parameter, torch.nn.Parameter]], scale: float):
        self.pieces = sorted(pieces, key=lambda piece: piece[0])  # (first row, A [r, in], B [out, r])
        self.scale = scale
        self.enabled = True

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        rows, row = [], 0
        for start, down, up in self.pieces:
            if start > row:
                rows.append(down.new_zeros(start - row, down.shape[1]))
            rows.append(up @ down)
            row = start + up.shape[0]
        if row < weight.shape[0]:
            rows.append(rows[0].new_zeros(weight.shape[0] - row, weight.shape[1]))
        return weight + (torch.cat(rows) * self.scale).to(weight.dtype)


class NativeDiT(TrainableDiT):
    """A clone of a native SD3 MODEL with the Kontext reference ability and, after add_lora, the adapter."""

    def __init__(self, model):
        self.patcher = with_kontext_reference(model)
        self.targets = lora_targets(self.patcher)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.deltas: list[LoRADelta] = []

    def on_device(self) -> "NativeDiT":
        """Let ComfyUI place the model (wrappers and object patches applied), with autograd-usable weights.

        The weights become normal tensors first: the loader made them under inference mode, and a move outside it
        (ComfyUI loading them to the GPU for training) would leave parameters torch can no longer use.
        """
        diffusion_model = self.patcher.model.diffusion_model
        memory.make_trainable(diffusion_model)
        diffusion_model.requires_grad_(False)
        memory.load_models(self.patcher)
        return self

    @property
    def dtype(self) -> torch.dtype:
        native = self.patcher.model
        return native.manual_cast_dtype or native.get_dtype()

    def __call__(self, x, timestep, tokens, pooled, reference):
        """As ComfyUI's BaseModel._apply_model casts and calls the MMDiT, returning its raw output (the velocity)."""
        cast = (lambda t: None if t is None else t.to(self.dtype))
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        return self.patcher.model.diffusion_model(cast(x), timestep.float(), context=cast(tokens), y=cast(pooled),
                                                  unipic2_ref=cast(reference), transformer_options=options)

    def add_lora(self, rank: int, alpha: float) -> None:
        device = memory.device()
        pieces: dict[str, list] = {}
        for module, target in sorted(self.targets.items()):
            out_features, in_features = target.shape
            down = torch.nn.Parameter(torch.zeros(rank, in_features, device=device))
            up = torch.nn.Parameter(torch.zeros(out_features, rank, device=device))
            self.params[f"{PREFIX}{module}.lora_A.weight"] = down
            self.params[f"{PREFIX}{module}.lora_B.weight"] = up
            pieces.setdefault(target.key, []).append((target.start, down, up))
        for key, key_pieces in pieces.items():
            delta = LoRADelta(key_pieces, alpha / rank)
            self.deltas.append(delta)
            self.patcher.add_weight_wrapper(key, delta)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.params)

    @contextmanager
    def adapter_disabled(self):
        for delta in self.deltas:
            delta.enabled = False
        try:
            yield
        finally:
            for delta in self.deltas:
                delta.enabled = True

    @contextmanager
    def checkpointing(self):
        """ComfyUI's MMDiT checkpoints each joint block itself when its use_checkpoint is set (the model object is
        shared by the MODEL's clones, so it is set only for the update and restored)."""
        diffusion_model = self.patcher.model.diffusion_model
        before = diffusion_model.use_checkpoint
        diffusion_model.use_checkpoint = True
        try:
            yield
        finally:
            diffusion_model.use_checkpoint = before

    def remove_lora(self) -> None:
        # The wrappers belong to this clone only; off and emptied, they add nothing and hold no adapter memory
        # should ComfyUI keep the clone loaded.
        for delta in self.deltas:
            delta.enabled = False
            delta.pieces = []
        self.params, self.deltas = {}, []

    def weight_shape(self, module: str) -> tuple[int, int] | None:
        target = self.targets.get(module)
        return None if target is None else target.shape


def native_training_models(model, vae, condition) -> TrainingModels:
    """The loop's TrainingModels on a native MODEL and VAE, each placed by ComfyUI's memory manager when used."""
    dit = NativeDiT(model)
    native = dit.patcher.model
    device = memory.device()

    def encode_image(image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # as ComfyUI's VAE Encode runs (see memory.load_on_device)
            latent = native.process_latent_in(vae.encode(image[..., :3]))
        return latent.clone().to(device)  # a normal tensor again, for the training graph

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            images = vae.decode(native.process_latent_out(latents.float()))
        return images.clone()

    return TrainingModels(
        dit=dit.on_device,
        condition=condition,
        encode_image=encode_image,
        decode=decode,
        scheduler_config={"shift": float(dit.patcher.get_model_object("model_sampling").shift)},
        latents=memory.latent_space(dit.patcher),
        device=device,
        base_model=memory.checkpoint_name(model),
    )


def prompt_condition(text_encoders: UniPic2Text | None, mllm: UniPic2MLLM | None, negative_prompt: str):
    """The loop's condition on whichever encoders the trainer got, each put on the device by ComfyUI when it
    encodes."""
    if text_encoders is not None:
        return text_condition(text_encoders.on_device, negative_prompt)
    return metaquery_condition(mllm.on_device, negative_prompt)


def step_reporter(trainer: GRPOTrainer, node_id: str | None, total_steps: int):
    """Hooks.on_step: each step in the log, on the progress bar, and to the browser as the trainer node's chart
    point with the step's samples."""
    start_step = trainer.step  # 0, or the step of the checkpoint it resumed
    bar = progress.progress_bar(total_steps)

    def on_step(report):
        total = report.rewards["total"]
        log.info("UniPic2 GRPO step %d/%d: reward %.4f (std %.4f), loss %.3g, kl %.3g, clipped %.2f, %.1fs",
                 report.step, report.total_steps, total[0], total[1], report.loss, report.kl,
                 report.clip_fraction, report.elapsed)
        bar.update_absolute(report.step, report.total_steps)  # samples travel with the chart, not as a preview
        grid = sample_grid(report.samples, columns=len(report.samples))[0]
        # This step's point only: the page appends it (a reloaded page fetches what it missed).
        messages.send_step(TRAINING_EVENT, node_id, start_step, report.total_steps, trainer.history[-1],
                           messages.jpeg_data_url(grid))

    return on_step


def train_lora(model, vae, prompts: list, reward: Reward, settings: GRPOSettings, lora_file: Path, resume: bool,
               lora: LoRAWeights | None, text_encoders: UniPic2Text | None, mllm: UniPic2MLLM | None,
               node_id: str | None):
    """The GRPO Trainer node's run on a native MODEL and VAE, conditioned by text_encoders or mllm: trains (or
    resumes) the LoRA at lora_file, writing it as the settings say, on Cancel and when a step fails. Returns
    (LoRA, curves IMAGE, samples IMAGE, summary); raises the host's interrupt after writing when cancelled."""
    condition = prompt_condition(text_encoders, mllm, settings.negative_prompt)
    with memory.training_mode():
        models = native_training_models(model, vae, condition)
        try:
            trainer = GRPOTrainer(models, reward, prompts, settings, lora_file, resume, lora)
        except ValueError as e:  # a refusal before training: bad settings, a name clash, another run's state
            raise ValueError(f"UniPic2 GRPO Trainer: {e}") from e
        try:  # from here on the trainer's adapter wraps the MODEL's clone: closing it unwraps
            hooks = Hooks(on_step=step_reporter(trainer, node_id, settings.steps),
                          cancel_requested=progress.cancel_requested)
            result = trainer.run(hooks)
        finally:
            trainer.close()
    if result.cancelled:
        log.info("UniPic2 GRPO Trainer: cancelled after step %d; checkpoint kept in %s", trainer.step, lora_file)
        progress.check_cancel()
    log.info("UniPic2 GRPO Trainer: LoRA written to %s", lora_file)
    history = result.history
    first, last = history[0]["rewards"]["total"][0], history[-1]["rewards"]["total"][0]
    summary = (f"UniPic2 GRPO: {trainer.step} steps, mean reward {first:.4f} (step 1) -> {last:.4f} (step "
               f"{trainer.step}); LoRA {lora_file}")
    return result.lora, plot_curves(history), sample_grid(result.samples), summary
