"""fp8 weight storage with a per-tensor scale, ComfyUI's "scaled fp8" representation: a Linear layer keeps fp8
values q as its weight and a float `weight_scale` s, the weight being q * s. The scale spreads each tensor over fp8's
whole range, so small weights (an LLM's are ~0.02) keep their 3 mantissa bits instead of falling into fp8's
subnormals. Such a layer runs anywhere (it dequantizes per forward); under ComfyUI its weights may also stream from
the offload device (nodes/host/partial_loading.py).
"""

import torch

FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_TYPES


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is stored as fp8 values times `weight_scale`; it computes in its input's dtype."""

    weight_scale: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.weight_scale, self.bias)


def store_fp8(layer: torch.nn.Linear, values: torch.Tensor, scale: float) -> None:
    """Make plain Linear `layer` an Fp8Linear holding fp8 `values` and their `scale`."""
    if type(layer) is torch.nn.Linear:
        layer.__class__ = Fp8Linear
    elif not isinstance(layer, Fp8Linear):
        raise TypeError(f"{type(layer).__name__} is not a plain Linear layer; it cannot store fp8 weights")
    layer.weight = torch.nn.Parameter(values, requires_grad=False)
    layer.weight_scale = float(scale)


def quantize_linears(module: torch.nn.Module, fp8: torch.dtype, keep: tuple[torch.nn.Module, ...] = ()) -> None:
    """Store the weight of every Linear layer of `module` (except the `keep` ones, and those already in fp8) as
    fp8 with its own scale."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and layer not in keep and not is_fp8(layer.weight):
            weight = layer.weight.detach().float()
            scale = weight.abs().amax().clamp(min=1e-12) / torch.finfo(fp8).max
            store_fp8(layer, (weight / scale).to(fp8), scale.item())
