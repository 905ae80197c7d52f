"""What stage 2 trains: the layers' weights beside [V] (Q/K/V of every attention layer, the paper's; LoRA on
them; or weights named by --layers regular expressions)."""

from __future__ import annotations

import warnings

import torch

from ..backbones.quantize import quantize_layers
from ..errors import UserError
from ..quiet import quiet_imports
from .config import STAGE1, STAGE_PLANS, TrainConfig, layer_patterns
from .lean import refuse_quantized

QKV = ("q_proj", "k_proj", "v_proj")


def select_layer_params(backbone, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Stage 2's targets, by parameter name, among the backbone's `trainable_parameters` (never its image
    tokenizer or vision encoder)."""
    named = backbone.trainable_parameters()
    if cfg.layers == "qkv":
        wanted = {f"{prefix}.{proj}.weight" for prefix in _attention_prefixes(backbone) for proj in QKV}
        chosen = {n: p for n, p in named.items() if n in wanted}
    else:
        patterns = layer_patterns(cfg.layers)
        chosen = {n: p for n, p in named.items() if any(pt.search(n) for pt in patterns)}
    if not chosen:
        raise UserError(f"--layers {cfg.layers!r} matches no parameter of {backbone.name}")
    return chosen


def _attention_prefixes(backbone) -> list[str]:
    names = {id(m): n for n, m in backbone.model.named_modules()}
    return [names[id(attn)] for attn in backbone.attention_layers()]


def add_lora(backbone, cfg: TrainConfig):
    """LoRA on Q/K/V of every `lora_every`-th layer, through peft, injected in place. Targets are named in
    full: a multimodal model (Janus-Pro's vision tower) has other q_proj/k_proj/v_proj that must stay as they are."""
    with quiet_imports():  # peft imports bitsandbytes, which talks on import (tokenbooth.quiet)
        from peft import LoraConfig, inject_adapter_in_model  # imported here: peft is only needed for --layers lora

    trainable = backbone.trainable_parameters()
    targets = [f"{prefix}.{proj}" for prefix in _attention_prefixes(backbone)[:: cfg.lora_every] for proj in QKV
               if f"{prefix}.{proj}.weight" in trainable]
    lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: the same seed gives the same run
    # quiet_imports again: peft imports bitsandbytes lazily too, when it picks the kind of its first LoRA layer
    with warnings.catch_warnings(), quiet_imports():
        # On a quantized base (QLoRA) peft warns that its TorchaoLoraLinear cannot merge(): tokenbooth merges an
        # adapter into the bf16 model only, never into the quantized one it trained on.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated", category=UserWarning)
        inject_adapter_in_model(lora_config, backbone.model)
    return lora_config


def lora_params(backbone) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in backbone.model.named_parameters() if ".lora_" in n}


def prepare_layers(backbone, cfg: TrainConfig):
    """Freezes the model, quantizes its frozen base if asked (lean.py; a no-op on a base loaded quantized) and
    picks stage 2's parameters: LoRA injected on Q/K/V, or the named weights. Returns (lora config or None,
    {name: parameter}). The picked weights stay in the model's dtype until a stage trains them (`train_layers`)."""
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    quantize_layers(backbone.decoder_layers(), cfg.quantize)
    if not trains_layers(cfg):
        return None, {}
    if cfg.layers == "lora":
        lora_config = add_lora(backbone, cfg)
        return lora_config, lora_params(backbone)
    return None, refuse_quantized(select_layer_params(backbone, cfg))


def trains_layers(cfg: TrainConfig) -> bool:
    """Whether any stage of the run trains layers (STAGE2, or JOINT): every stage but STAGE1 does."""
    return any(stage != STAGE1 for stage in STAGE_PLANS[cfg.stages])


def train_layers(layer_params: dict, train: bool) -> None:
    """Layers join (stage 2, joint) as fp32 master weights, autocast computing in the model's dtype; stage 1
    leaves them as they are, in the model's dtype, and frozen."""
    for p in layer_params.values():
        if train and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(train)
