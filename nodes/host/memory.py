"""The one place that touches ComfyUI's memory manager: the pack's own modules wrapped in ModelPatchers and loaded
where ComfyUI decides, LoRAs as weight patches, autograd back for training, and what other modules need to know of
a ModelPatcher's insides, as named functions.

Written against ComfyUI 0.3.75, the minimum version the pack supports (docs/architecture.md §7).
"""

import contextlib

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from comfy.patcher_extension import CallbacksMP

from ...unipic_core.inference.latents import LatentSpace
from .partial_loading import make_castable, move_buffers, report_device

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CHECKPOINT_KEY = "unipic2_checkpoint"  # model_options entry: the folder a UniPic2 loader read the MODEL from


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


def record_checkpoint(model: ModelPatcher, name: str) -> None:
    """Record on a native MODEL the checkpoint folder a UniPic2 loader read it from (clones keep it)."""
    model.model_options[_CHECKPOINT_KEY] = name


def checkpoint_name(model: ModelPatcher) -> str:
    """The checkpoint folder name a UniPic2 loader recorded on a native MODEL (clones keep it); "" for a MODEL
    from another loader (Load Diffusion Model, a GGUF loader...)."""
    return str(model.model_options.get(_CHECKPOINT_KEY, ""))


def carries_weight_patches(model: ModelPatcher) -> bool:
    """True when a LoRA loader (or any weight patch) changed the MODEL's weights."""
    return bool(model.patches)


def fp8_fast(model: ModelPatcher) -> bool:
    """True for weight_dtype fp8_e4m3fn_fast: ComfyUI then multiplies in fp8, where no LoRA delta can be added."""
    return bool(model.model.model_config.optimizations.get("fp8"))


def latent_space(model: ModelPatcher) -> LatentSpace:
    """A native MODEL's latent conventions: its latent format's shift, scale and channels, its DiT's patch size."""
    latent_format = model.get_model_object("latent_format")
    return LatentSpace(latent_format.shift_factor, latent_format.scale_factor, latent_format.latent_channels,
                       patch=model.get_model_object("diffusion_model").patch_size)


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


def cached(key: tuple, load, cache: dict):
    """load(), kept in `cache` until a different key is asked of it: one model per cache stays loaded."""
    if key not in cache:
        cache.clear()  # free the previous checkpoint before loading the next
        cache[key] = load()
    return cache[key]
