"""The pack's own graph types (where ComfyUI has no native one): loaded components wrapped for ComfyUI's memory
manager."""

from dataclasses import dataclass

from comfy.model_patcher import ModelPatcher

from ...unipic_core.models.metaquery import MetaQueryMLLM
from ...unipic_core.models.text_encoding import SD3TextEncoders
from . import memory


@dataclass
class UniPic2Text:
    """UNIPIC2_TEXT: CLIP-L, CLIP-G and T5, one ModelPatcher each so ComfyUI can offload T5 alone."""

    encoders: SD3TextEncoders
    patchers: list[ModelPatcher]

    def on_device(self) -> SD3TextEncoders:
        memory.load_on_device(*self.patchers)
        return self.encoders


@dataclass
class UniPic2MLLM:
    """UNIPIC2_MLLM: Qwen2.5-VL + processor + MetaQuery conditioner, the MLLM and the conditioner in their own
    ModelPatchers so ComfyUI can offload the 7B MLLM before sampling."""

    encoder: MetaQueryMLLM
    mllm_patcher: ModelPatcher
    conditioner_patcher: ModelPatcher
    # what was loaded ("<Qwen folder or file name>, <dtype>, mllm_weights <storage>"), for the fingerprints of
    # rewards that judge with it: a resumed run must find the same MLLM
    source: str = ""

    def on_device(self) -> MetaQueryMLLM:
        """The MLLM and the conditioner on the device: for encoding prompts."""
        memory.load_on_device(self.mllm_patcher, self.conditioner_patcher)
        return self.encoder

    def mllm_on_device(self) -> MetaQueryMLLM:
        """Only the 7B MLLM on the device: for answering and judging, which do not use the conditioner."""
        memory.load_on_device(self.mllm_patcher)
        return self.encoder
