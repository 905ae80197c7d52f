"""Memory-lean personalization: a frozen base in 4 or 8 bits, and an 8-bit AdamW.

Quantized base (`--quantize`), through torchao (pytorch/ao):
  nf4   QLoRA's 4-bit NormalFloat, blocks of 64 weights with double-quantized scales (~0.52 bytes a
        weight): torchao's NF4Tensor, the weight type of torchtune's QLoRA recipes.
  int8  8-bit weight-only, one scale per output row (~1 byte a weight): torchao's Int8WeightOnlyConfig.
Only the Linear layers of the transformer's decoder layers are quantized: the token embeddings (where [V]
lives), the output layer and the image tokenizer stay in the checkpoint's dtype. A quantized weight is
dequantized to the compute dtype for each matrix product, forward and backward, so gradients reach [V]
through every frozen layer and LoRA trains on top (QLoRA). The trained parameters stay fp32.

Why torchao and not bitsandbytes: both run on a CPU, but torchao's weights are tensor subclasses that
PyTorch's fake tensors understand, so `tokenbooth plan` measures a quantized step exactly as it runs;
bitsandbytes' Params4bit cannot be built over a fake tensor. bitsandbytes gives the 8-bit AdamW, which runs
eagerly on CPU and GPU (torchao's compiles every step with torch.compile).
"""

from __future__ import annotations

import torch

from ..errors import UserError

QUANTIZE = ("none", "int8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit")
NF4_BLOCK = 64  # weights per NF4 scale (QLoRA's block size)


def check_lean_options(quantize: str, optimizer: str, layers: str) -> None:
    """Refuses what cannot work, in one line, before anything is loaded."""
    if quantize not in QUANTIZE:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {quantize!r})")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {optimizer!r})")
    if quantize != "none" and layers == "qkv":
        raise UserError(f"--layers qkv trains the Q/K/V weights themselves, and a --quantize {quantize} base stores "
                        f"them in {4 if quantize == 'nf4' else 8} bits, which gradient steps cannot update: use "
                        f"--layers lora (QLoRA) or --quantize none")
    for flag, value in (("quantize", quantize), ("optimizer", optimizer)):
        if (flag, value) in LIBRARY:
            _require(LIBRARY[flag, value], f"--{flag} {value}")


def can_import(module: str) -> bool:
    """Whether an optional library loads here (`_require` says why not)."""
    try:
        _require(module, module)
    except UserError:
        return False
    return True


# The optional library each lean choice needs.
LIBRARY = {("quantize", "nf4"): "torchao", ("quantize", "int8"): "torchao", ("optimizer", "adamw8bit"): "bitsandbytes"}


def _require(module: str, what: str) -> None:
    import importlib
    import logging

    from ..backbones.hf import quiet_imports

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # notes about optional CPU kernels at import
    try:
        with quiet_imports():
            importlib.import_module(module)
    except Exception as e:  # a missing package, or one built for another platform
        raise UserError(f"{what} needs {module}, which cannot be imported here ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pip install {module}") from None


def decoder_layers(backbone) -> list[torch.nn.Module]:
    """The transformer blocks: the modules holding the attention layers stage 2 adapts. Their Linear layers
    are what a quantized base quantizes."""
    modules = dict(backbone.model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    return [modules[names[id(attn)].rsplit(".", 1)[0]] for attn in backbone.attention_layers()]


def quantize_layers(layers: list[torch.nn.Module], kind: str, copy_layouts: bool = False) -> int:
    """Replaces every nn.Linear inside `layers` (the decoder layers) by a `QuantizedLinear` holding its weight
    in `kind`, frozen. Returns how many were replaced.

    copy_layouts: give every weight the quantized tensors of the first weight of its shape, for fake tensors,
    whose values do not exist: the planner gets the same tensors without running the quantizer 200 times."""
    if kind == "none":
        return 0
    _require("torchao", f"--quantize {kind}")
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
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        if weight.numel() % NF4_BLOCK:
            raise UserError(f"--quantize nf4: a {list(weight.shape)} weight is not a whole number of "
                            f"{NF4_BLOCK}-weight blocks")
        blocks = weight.numel() // NF4_BLOCK
        scaler_block = max(d for d in range(1, 257) if blocks % d == 0)  # QLoRA's 256, or what divides
        return to_nf4(weight.contiguous(), NF4_BLOCK, scaler_block)
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        holder = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        holder.weight = torch.nn.Parameter(weight, requires_grad=False)
        quantize_(holder, Int8WeightOnlyConfig())
        return holder.weight.detach()
    raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {kind!r})")


def dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight back in `dtype`, for one matrix product."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

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


def refuse_quantized(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Stage 2's targets, unless one of them is a quantized weight (which a gradient step cannot update)."""
    for name, p in params.items():
        if is_quantized(p):
            raise UserError(f"--layers selects {name}, which the quantized base stores in 4 or 8 bits and gradient "
                            f"steps cannot update: use --layers lora (QLoRA) or --quantize none")
    return params


def make_optimizer(kind: str, groups: list[dict]):
    """AdamW over parameter groups, without weight decay (the recipe's parameters are an embedding row and
    projections that should stay where the data takes them). adamw8bit keeps both moments in 8 bits,
    blockwise (bitsandbytes), a quarter of AdamW's 8 bytes a parameter."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=0.0)
    if kind == "adamw8bit":
        _require("bitsandbytes", "--optimizer adamw8bit")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=0.0)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {kind!r})")
