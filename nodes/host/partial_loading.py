"""The pack's own transformers / diffusers modules (the SD3 text encoders, Qwen2.5-VL, the MetaQuery conditioner)
under ComfyUI's partial loading.

ComfyUI loads a model partially by leaving the layers that do not fit on the offload device and casting their
weights onto the compute device per forward; it does this for layers that have `comfy_cast_weights` (its comfy.ops
layers). `make_castable` gives that ability to every weight-holding leaf layer of a module without touching its
maths: when casting is asked for, the layer's own forward runs on the cast copies of its weights, so a full load
computes exactly what the unconverted module does. Layers keep their stored dtype when cast (an fp8 layer of
unipic_core.models.fp8_weights dequantizes in its own forward).
"""

import torch
from comfy.model_patcher import ModelPatcher
from comfy.ops import CastWeightBiasOp, cast_bias_weight, run_every_op, uncast_bias_weight

CASTABLE_PARAMETERS = {"weight", "bias"}  # what ComfyUI's cast (cast_bias_weight) knows how to move
_CASTABLE_CLASSES: dict[type, type] = {}


class CastOnForward(CastWeightBiasOp):
    """Mixed into a layer's own class: its forward on weights ComfyUI cast to the input's device whenever ComfyUI
    asks for casting (the layer stayed offloaded) or patches the weights on the fly (LoRAs)."""

    def forward(self, *args, **kwargs):
        run_every_op()  # as ComfyUI's own layers: Cancel is honoured between layers
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(*args, **kwargs)
        if self.weight_function and self.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise RuntimeError("weight patches (LoRAs) on layers stored in fp8 are not supported; load the model "
                               "without fp8 weights to patch it")
        device = next(a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        weight, bias, stream = cast_bias_weight(self, dtype=self.weight.dtype, device=device, offloadable=True)
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


def make_castable(module: torch.nn.Module) -> None:
    """Give every leaf layer of `module` whose parameters are a weight (and bias) ComfyUI's cast-on-forward."""
    for layer in module.modules():
        names = {name for name, _ in layer.named_parameters(recurse=False)}
        if (not names or not names <= CASTABLE_PARAMETERS or any(True for _ in layer.children())
                or isinstance(layer, CastOnForward)):
            # parameter-free, done, or a container: ComfyUI never moves a container's own parameters in a partial
            # load (the conditioner's meta queries: the encoder copies them to the device itself)
            continue
        layer.__class__ = castable_class(type(layer))
        if "bias" not in names and not hasattr(layer, "bias"):
            layer.bias = None  # ComfyUI's cast reads .bias; an RMSNorm has none


def report_device(module: torch.nn.Module, device: torch.device) -> None:
    """Make `module.device` say where it computes. transformers' generate() puts its inputs on model.device, the
    device of the first parameter, which a partial load may leave offloaded."""
    module.__class__ = type(type(module).__name__, (type(module),), {"device": property(lambda self: device)})


def move_buffers(patcher: ModelPatcher, device_to, *_) -> None:
    """ComfyUI moves weights, and buffers only with a full load; a module's buffers (CLIP's position_ids) must be
    on the compute device however much of it is resident. So must the weights a container holds itself beside its
    layers (CLIP's class embedding), which a partial load never places. An ON_LOAD callback; unloading moves all
    of them back with the model."""
    if device_to is None:
        return
    device = torch.device(device_to)
    for module in patcher.model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)
        if any(True for _ in module.children()):
            for name, param in module._parameters.items():
                if param is not None and param.device != device:
                    module._parameters[name] = torch.nn.Parameter(param.to(device), requires_grad=param.requires_grad)
