"""The one place that touches the ComfyUI host: model folders, memory manager, progress bar and Cancel (messages to
the browser: messages.py).

Written against ComfyUI 0.3.75, the minimum version the pack supports (docs/architecture.md §7).
"""

import contextlib
import logging
import os
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import CallbacksMP

from .partial_loading import make_castable, move_buffers, report_device

log = logging.getLogger("unipic2")

UNIPIC2_FOLDER = "unipic2"
folder_paths.add_model_folder_path(UNIPIC2_FOLDER, os.path.join(folder_paths.models_dir, UNIPIC2_FOLDER))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECKPOINT_KEY = "unipic2_checkpoint"  # model_options entry: the checkpoint folder a UniPic2 loader read the MODEL from


def model_folders(kind: str) -> list[str]:
    """The registered folders of a model kind ("unipic2", "diffusers"); none when the host lacks the kind."""
    try:
        return folder_paths.get_folder_paths(kind)
    except KeyError:
        return []


def unipic2_download_folder() -> str:
    return model_folders(UNIPIC2_FOLDER)[0]


def pick_dtype(choice: str) -> torch.dtype:
    """'auto' is bf16 where the device supports it, fp16 on other GPUs, fp32 on the CPU."""
    if choice != "auto":
        return DTYPES[choice]
    device = mm.get_torch_device()
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float16 if mm.should_use_fp16(device) else torch.float32


class Component(torch.nn.Module):
    """What a ModelPatcher manages: one diffusers/transformers model under `.module`.

    ComfyUI assigns `.device` (and bookkeeping attributes) on the object it manages; diffusers and transformers
    models expose `device` as a read-only property, so they cannot be handed to ModelPatcher directly.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def wrap(module: torch.nn.Module) -> ModelPatcher:
    """A ModelPatcher around one of the pack's own modules, which ComfyUI can load fully or partially (its layers
    made castable); its size for ComfyUI's planning is the module's true size."""
    make_castable(module)
    report_device(module, mm.get_torch_device())
    patcher = ModelPatcher(Component(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.add_callback(CallbacksMP.ON_LOAD, move_buffers)
    return patcher


def checkpoint_name(model: ModelPatcher) -> str:
    """The checkpoint folder name a UniPic2 loader recorded on a native MODEL (clones keep it); "" for a MODEL
    from another loader (Load Diffusion Model, a GGUF loader...)."""
    return str(model.model_options.get(CHECKPOINT_KEY, ""))


def device() -> torch.device:
    return mm.get_torch_device()


def load_models(*patchers: ModelPatcher) -> None:
    """Let ComfyUI place these models on the compute device, fully or partially, evicting others as it sees fit."""
    mm.load_models_gpu(list(patchers))


def load_on_device(*patchers: ModelPatcher) -> list[torch.nn.Module]:
    """load_models for components of the pack's own (Component-wrapped) models, returning the modules.

    Always under inference mode, as ComfyUI runs nodes: their weights were made there, and moving an inference
    tensor outside it (a trainer step does) leaves a parameter torch can no longer use.
    """
    with torch.inference_mode():
        load_models(*patchers)
    return [p.model.module for p in patchers]


def input_folder() -> Path:
    return Path(folder_paths.get_input_directory()).resolve()


def input_path(text: str, node: str, name: str) -> Path:
    """A file or folder the user named, relative to ComfyUI's input folder, with links resolved; anything that
    ends up outside that folder is refused (a shared server must not read files its users may not)."""
    root = input_folder()
    path = (root / text.strip()).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{node}: '{name}' is '{text.strip()}', which is outside ComfyUI's input folder; put it in "
                         f"{root} (a subfolder is fine) and give its path relative to that folder")
    return path


def lora_folder() -> str:
    """Where the trainer writes LoRAs: models/loras/unipic2 (listed by every LoRA loader)."""
    return os.path.join(folder_paths.get_folder_paths("loras")[0], UNIPIC2_FOLDER)


def text_encoder_files() -> dict[str, Path]:
    """The .safetensors files in models/text_encoders (and the folders registered for it), by their listed name."""
    return {name: Path(folder_paths.get_full_path("text_encoders", name))
            for name in folder_paths.get_filename_list("text_encoders") if name.endswith(".safetensors")}


def qwen25_tokenizer_folder() -> Path:
    """The Qwen2.5 tokenizer ComfyUI ships for its Qwen-Image text encoder (vocab.json, merges.txt)."""
    import comfy.sd

    return Path(comfy.sd.__file__).parent / "text_encoders" / "qwen25_tokenizer"


def lora_files() -> list[str]:
    return [name for name in folder_paths.get_filename_list("loras") if name.endswith(".safetensors")]


def lora_path(name: str) -> str:
    return folder_paths.get_full_path("loras", name)


def patch_lora(model: ModelPatcher, tensors: dict[str, torch.Tensor], strength: float) -> tuple[ModelPatcher, int]:
    """A clone of a native MODEL with a diffusers-named LoRA ('transformer.<module>.lora_A/B.weight') as weight
    patches, placed by the host's own key map and comfy.lora.load_lora, as LoraLoaderModelOnly places them.
    Returns the clone and how many modules got a patch."""
    import comfy.lora

    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(model.model, {}))
    clone = model.clone()
    return clone, len(clone.add_patches(patches, strength))


def patch_component_lora(patcher: ModelPatcher, lora: dict) -> ModelPatcher:
    """A clone of one of the pack's own (Component-wrapped) models with a LoRA as weight patches: {module name in the
    wrapped module: LinearLoraPair (down, up, alpha)}, through comfy.lora.load_lora as any LoRA loader. The clone
    shares the weights; ComfyUI patches them when it loads the clone and restores them when another clone takes its
    turn. Raises if any LoRA weight finds no module to patch, so a LoRA never half-applies."""
    import comfy.lora

    tensors, to_load = {}, {}
    for name, weights in lora.items():
        tensors.update({f"{name}.lora_A.weight": weights.down, f"{name}.lora_B.weight": weights.up,
                        f"{name}.alpha": torch.tensor(weights.alpha)})
        to_load[name] = f"module.{name}.weight"  # the Component's state-dict key
    clone = patcher.clone()
    patched = clone.add_patches(comfy.lora.load_lora(tensors, to_load))
    if len(patched) != len(lora):
        missing = sorted(set(to_load.values()) - set(patched))
        raise ValueError(f"UniPic2: the LoRA adapts {len(lora)} layers, but only {len(patched)} were patched "
                         f"(first missing: {missing[:3]}); is it for this model?")
    return clone


@contextlib.contextmanager
def training_mode():
    """ComfyUI runs nodes under inference_mode; training needs autograd back."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def make_trainable(module: torch.nn.Module) -> None:
    """Replace inference tensors (made when the loader ran under inference_mode) by normal copies: autograd can
    neither save nor version-count them. A no-op once done."""
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()


def cancel_requested() -> bool:
    return mm.processing_interrupted()


def download_progress():
    """A tqdm class for hub downloads: the console bar as usual, mirrored on ComfyUI's progress bar."""
    from tqdm.auto import tqdm

    class ComfyProgress(tqdm):
        def update(self, n=1):
            shown = super().update(n)
            total = max(int(self.total or 0), int(self.n), 1)
            if not hasattr(self, "comfy_bar"):
                self.comfy_bar = comfy.utils.ProgressBar(total)
            self.comfy_bar.update_absolute(int(self.n), total)
            return shown

    return ComfyProgress


def check_cancel() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


def sampling_callback(model: ModelPatcher, steps: int):
    """ComfyUI's sampler callback (progress bar with latent previews, as KSampler's) that also stops at the end of
    the step during which the user pressed Cancel."""
    import latent_preview

    show = latent_preview.prepare_callback(model, steps)

    def callback(step, x0, x, total_steps):
        show(step, x0, x, total_steps)
        check_cancel()

    return callback


class StepProgress:
    """ComfyUI progress bar with an optional RGB preview [h, w, 3] per step."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, done: int, total: int, preview_rgb: torch.Tensor | None = None) -> None:
        preview = None
        if preview_rgb is not None:
            from ..unipic_core.images import to_pil

            preview = ("JPEG", to_pil(preview_rgb), 512)
        self.bar.update_absolute(done, total, preview)
