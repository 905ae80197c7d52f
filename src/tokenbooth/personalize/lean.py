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

from ..backbones.quantize import QUANTIZE, is_quantized, quantize_layers  # noqa: F401 (quantize_layers: re-exported)
from ..errors import UserError
from ..quiet import require_optional as _require

OPTIMIZERS = ("adamw", "adamw8bit")


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


def refuse_quantized(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Stage 2's targets, unless one of them is a quantized weight (which a gradient step cannot update)."""
    for name, p in params.items():
        if is_quantized(p):
            raise UserError(f"--layers selects {name}, which the quantized base stores in 4 or 8 bits and gradient "
                            f"steps cannot update: use --layers lora (QLoRA) or --quantize none")
    return params


def make_optimizer(kind: str, groups: list[dict], weight_decay: float = 0.0):
    """AdamW over parameter groups; weight decay is TrainConfig.weight_decay, none by default (the recipe's
    parameters are an embedding row and projections that should stay where the data takes them). adamw8bit
    keeps both moments in 8 bits, blockwise (bitsandbytes), a quarter of AdamW's 8 bytes a parameter."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if kind == "adamw8bit":
        _require("bitsandbytes", "--optimizer adamw8bit")
        import bitsandbytes as bnb  # an optional extra: imported only when asked for

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {kind!r})")
