"""The DiT as the sampling and training loops see it: a velocity forward and one trainable LoRA adapter.

Two implementations share this contract: `DiffusersDiT` below (diffusers' KontextSD3Transformer with a peft
adapter, for plain scripts and torchrun) and the trainer node's DiT on a native ComfyUI MODEL
(nodes/host/native_training.py: the adapter as ModelPatcher weight wrappers). The loop never sees which one it drives.
"""

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import ContextManager

import torch

from .lora import ADAPTER, PREFIX, lora_config


class TrainableDiT(ABC):
    """The Kontext DiT with at most one LoRA adapter, its trainable parameters named as in the LoRA file."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype conditioning is cast to before a forward."""

    @abstractmethod
    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
                 reference: torch.Tensor | None) -> torch.Tensor:
        """Velocity [B, C, H, W] of model-space latents x [B, C, H, W] at timestep [B] (sigma * 1000); tokens
        [B, L, 4096] and pooled [B, 2048] in `dtype`; reference: model-space [B, C, H, W] or None."""

    @abstractmethod
    def add_lora(self, rank: int, alpha: float) -> None:
        """Add a float32 adapter (scale alpha / rank) on the attention projections of both streams
        (lora.TARGET_MODULES) with every other weight frozen; its values are set afterwards."""

    @abstractmethod
    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The live adapter's A and B under file key names ('transformer.<module>.lora_A.weight')."""

    @abstractmethod
    def adapter_disabled(self) -> ContextManager:
        """Within it, forwards compute the DiT without the adapter (GRPO's KL reference)."""

    @abstractmethod
    def checkpointing(self) -> ContextManager:
        """Within it, forwards that track gradients keep only each block's inputs and recompute the rest in the
        backward pass: much less activation memory for about a third more compute (gradient checkpointing)."""

    @abstractmethod
    def remove_lora(self) -> None:
        """Take the adapter out again, leaving the DiT as it was loaded."""

    @abstractmethod
    def weight_shape(self, module: str) -> tuple[int, int] | None:
        """(out, in) of a diffusers-named module's weight ('transformer_blocks.0.attn.to_q'), None if absent."""


class DiffusersDiT(TrainableDiT):
    """A diffusers KontextSD3Transformer (already on its device) with a peft adapter."""

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def __call__(self, x, timestep, tokens, pooled, reference):
        return self.transformer(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=timestep, ref_hidden_states=reference, return_dict=False)[0]

    def add_lora(self, rank: int, alpha: float) -> None:
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(lora_config(rank, alpha), adapter_name=ADAPTER)
        for p in self.adapter_parameters().values():
            p.data = p.data.float()
            p.requires_grad_(True)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {PREFIX + name.replace(f".{ADAPTER}", ""): p
                for name, p in self.transformer.named_parameters() if f".{ADAPTER}." in name}

    @contextmanager
    def adapter_disabled(self):
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    @contextmanager
    def checkpointing(self):
        self.transformer.enable_gradient_checkpointing()
        try:
            yield
        finally:
            self.transformer.disable_gradient_checkpointing()

    def remove_lora(self) -> None:
        self.transformer.unload_lora()

    def weight_shape(self, module: str) -> tuple[int, int] | None:
        try:
            return tuple(self.transformer.get_submodule(module).weight.shape)
        except AttributeError:
            return None
