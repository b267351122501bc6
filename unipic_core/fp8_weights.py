"""fp8 weight storage with a per-tensor scale, ComfyUI's "scaled fp8" representation: a Linear layer keeps fp8
values q as its weight and a float32 `weight_scale` s, the weight being q * s. The scale spreads each tensor over
fp8's whole range, so small weights (an LLM's are ~0.02) keep their 3 mantissa bits instead of falling into fp8's
subnormals. The host's castable layers (nodes/partial_loading.py) dequantize per forward.
"""

import torch

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_TYPES


def set_fp8_weight(layer: torch.nn.Module, values: torch.Tensor, scale: torch.Tensor) -> None:
    layer.weight = torch.nn.Parameter(values, requires_grad=False)
    layer.weight_scale = scale.float()


def quantize_linears(module: torch.nn.Module, fp8: torch.dtype, keep: tuple[torch.nn.Module, ...] = ()) -> None:
    """Store the weight of every Linear layer of `module` (except the `keep` ones, and those already in fp8) as
    fp8 with its own scale."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and layer not in keep and not is_fp8(layer.weight):
            weight = layer.weight.detach().float()
            scale = weight.abs().amax().clamp(min=1e-12) / torch.finfo(fp8).max
            set_fp8_weight(layer, (weight / scale).to(fp8), scale)
