"""The pack's own transformers / diffusers modules (the SD3 text encoders, Qwen2.5-VL, the MetaQuery conditioner)
under ComfyUI's partial loading and fp8 weight storage.

ComfyUI loads a model partially by leaving the layers that do not fit on the offload device and casting their
weights onto the compute device per forward; it does this for layers that have `comfy_cast_weights` (its comfy.ops
layers). `make_castable` gives that ability to every weight-holding leaf layer of a module without touching its
maths: when casting is asked for, the layer's own forward runs on the cast copies of its weights, so a full load
computes exactly what the unconverted module does and a partial load what ComfyUI's cast gives.
"""

import comfy.model_management as mm
import torch
from comfy.model_patcher import ModelPatcher
from comfy.ops import CastWeightBiasOp, cast_bias_weight, uncast_bias_weight
from comfy.patcher_extension import CallbacksMP

from ..unipic_core.fp8_weights import is_fp8

CASTABLE_PARAMETERS = {"weight", "bias"}  # what ComfyUI's cast (cast_bias_weight) knows how to move
_CASTABLE_CLASSES: dict[type, type] = {}


class CastOnForward(CastWeightBiasOp):
    """Mixed into a layer's own class: its forward on weights ComfyUI cast to the input's device (and from fp8
    storage to `compute_dtype`, times `weight_scale`) whenever ComfyUI asks for casting or patches the weights on
    the fly."""

    compute_dtype: torch.dtype  # what the layer's forward computes with
    weight_scale: torch.Tensor | None = None  # fp8 storage's scale (unipic_core/fp8_weights.py)

    def forward(self, *args, **kwargs):
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(*args, **kwargs)
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        weight, bias, stream = cast_bias_weight(self, dtype=self.compute_dtype, device=device, offloadable=True)
        if self.weight_scale is not None:  # no weight patches on fp8 layers: they would see the unscaled values
            weight = weight * self.weight_scale.to(device, weight.dtype)
        stored = self._parameters
        object.__setattr__(self, "_parameters", {**stored, "weight": weight,
                                                 **({"bias": bias} if "bias" in stored else {})})
        try:
            return super().forward(*args, **kwargs)
        finally:
            object.__setattr__(self, "_parameters", stored)
            uncast_bias_weight(self, weight, bias, stream)


def castable_class(cls: type) -> type:
    if cls not in _CASTABLE_CLASSES:
        _CASTABLE_CLASSES[cls] = type(f"Castable{cls.__name__}", (CastOnForward, cls), {})
    return _CASTABLE_CLASSES[cls]


def make_castable(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Give every leaf layer of `module` whose parameters are a weight (and bias) ComfyUI's cast-on-forward. A layer
    computes in its own dtype, one stored in fp8 in `compute_dtype` (and always casts)."""
    for layer in module.modules():
        names = {name for name, _ in layer.named_parameters(recurse=False)}
        if (not names or not names <= CASTABLE_PARAMETERS or any(True for _ in layer.children())
                or isinstance(layer, CastOnForward)):
            continue  # parameter-free, a container (the conditioner's own meta_queries: loaded whole), or done
        layer.__class__ = castable_class(type(layer))
        layer.compute_dtype = compute_dtype if is_fp8(layer.weight) else layer.weight.dtype
        layer.comfy_cast_weights = is_fp8(layer.weight)  # fp8 is cast on every forward, resident or not
        if "bias" not in names and not hasattr(layer, "bias"):
            layer.bias = None  # ComfyUI's cast reads .bias; an RMSNorm has none


class Component(torch.nn.Module):
    """What a ModelPatcher manages: one diffusers/transformers model under `.module`.

    ComfyUI assigns `.device` (and bookkeeping attributes) on the object it manages; diffusers and transformers
    models expose `device` as a read-only property, so they cannot be handed to ModelPatcher directly.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def move_buffers(patcher: ModelPatcher, device_to, *_) -> None:
    """ComfyUI moves weights, and buffers only with a full load; rotary tables (inv_freq) must be on the compute
    device however much of the model is resident."""
    if device_to is not None:
        for module in patcher.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device != torch.device(device_to):
                    module._buffers[name] = buffer.to(device_to)


def wrap(module: torch.nn.Module, compute_dtype: torch.dtype) -> ModelPatcher:
    """A ModelPatcher around one of the pack's modules (made castable; compute_dtype: what its fp8-stored layers, if
    any, compute in), which ComfyUI can load fully or partially; its size for ComfyUI's planning is the module's
    true size."""
    make_castable(module, compute_dtype)
    patcher = ModelPatcher(Component(module), load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.add_callback(CallbacksMP.ON_LOAD, move_buffers)
    return patcher
