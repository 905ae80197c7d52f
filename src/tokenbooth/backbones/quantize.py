"""A frozen base in 4 or 8 bits: the Linear layers of a backbone's decoder layers stored quantized, through
torchao (pytorch/ao), for memory-lean personalization (personalize/lean.py) and for `tokenbooth plan`.

  nf4   QLoRA's 4-bit NormalFloat, blocks of 64 weights with double-quantized scales (~0.52 bytes a
        weight): torchao's NF4Tensor, the weight type of torchtune's QLoRA recipes.
  int8  8-bit weight-only, one scale per output row (~1 byte a weight): torchao's Int8WeightOnlyConfig.
Only the Linear layers of the transformer's decoder layers are quantized: the token embeddings (where the
learned token lives), the output layer and the image tokenizer stay in the checkpoint's dtype. A quantized
weight is dequantized to the compute dtype for each matrix product, forward and backward, so gradients reach
the embeddings through every frozen layer and LoRA trains on top (QLoRA).

Why torchao and not bitsandbytes: torchao's weights are tensor subclasses that PyTorch's fake tensors
understand, so `tokenbooth plan` measures a quantized step exactly as it runs; bitsandbytes' Params4bit
cannot be built over a fake tensor. torchao is an optional extra, imported only when a base is quantized.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..quiet import require_optional

QUANTIZE = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's block size)


def quantize_layers(layers: list[torch.nn.Module], kind: str, copy_layouts: bool = False) -> int:
    """Replaces every nn.Linear inside `layers` (the decoder layers) by a `QuantizedLinear` holding its weight
    in `kind`, frozen. Returns how many were replaced.

    copy_layouts: give every weight the quantized tensors of the first weight of its shape, for fake tensors,
    whose values do not exist: the planner gets the same tensors without running the quantizer 200 times."""
    if kind == "none":
        return 0
    require_optional("torchao", f"--quantize {kind}")
    first: dict[tuple, torch.Tensor] = {}
    count = 0
    for layer in layers:
        for name, module in list(layer.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            key = (tuple(module.weight.shape), module.weight.dtype)
            if copy_layouts and key in first:  # NF4's clone re-runs the quantizer; empty_like copies the layout
                weight = (torch.empty_like if kind == "nf4" else torch.clone)(first[key])
            else:
                weight = first[key] = _quantized(module.weight.detach(), kind)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, QuantizedLinear(module, weight))
            count += 1
    return count


def _quantized(weight: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4  # optional extra

        if weight.numel() % NF4_BLOCK:
            raise UserError(f"--quantize nf4: a {list(weight.shape)} weight is not a whole number of "
                            f"{NF4_BLOCK}-weight blocks")
        blocks = weight.numel() // NF4_BLOCK
        scaler_block = max(d for d in range(1, 257) if blocks % d == 0)  # QLoRA's 256, or what divides
        return to_nf4(weight.contiguous(), NF4_BLOCK, scaler_block)
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # optional extra

        holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        return holder.weight.detach()
    raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {kind!r})")


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight back in `dtype`, for one matrix product."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor  # optional extra

    return weight.to(dtype) if isinstance(weight, NF4Tensor) else weight.dequantize().to(dtype)


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x @ W.T for a frozen quantized W that keeps only the quantized W for the backward pass (the gradient
    with respect to x needs W, never W's own gradient): torchao's int8 linear would save a dequantized copy."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, dense(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ dense(weight, grad.dtype), None


class QuantizedLinear(torch.nn.Linear):
    """nn.Linear with a frozen quantized weight (peft's LoRA wraps it like any Linear)."""

    def __init__(self, linear: torch.nn.Linear, weight: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        out = _FrozenQuantizedMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def is_quantized(param: torch.Tensor) -> bool:
    return type(param.data) not in (torch.Tensor,) and hasattr(param.data, "__tensor_flatten__")
