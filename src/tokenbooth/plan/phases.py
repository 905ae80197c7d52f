"""What each phase of a personalization run does on the device, written once and run two ways: on fake
tensors by the planner (`tokenbooth plan`), on real tensors by the validation benchmark.

  stage1        the references' VQ codes (once), then steps that train [V] alone
  stage2        steps that train [V] and the layers (Q/K/V, or LoRA on them)
  sampling-cfg  one image per prompt with the plain sampler: a decoding step at the last position, the KV cache
                full (two rows per image under classifier-free guidance), then the VQ decoder
  sampling-sjd  the same with speculative Jacobi decoding: a window of draft tokens per step

A training phase takes two optimizer steps, so the second runs with the first's optimizer state in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..personalize.lean import make_optimizer, quantize_layers, refuse_quantized
from ..personalize.recipe import (Placeholder, TrainConfig, _autocast_for, add_lora, batch_loss,
                                  enable_gradient_checkpointing, lora_params, select_layer_params, stage_params)
from ..sampling import SamplingConfig

PROMPT = "a photo of [V] dog on the beach"  # the length of a typical prompt; planning needs no more of it
REFERENCES = 4  # reference images encoded in stage 1's setup (DreamBench has 4-6 per subject)


@dataclass
class RunSettings:
    """Everything a plan varies: the recipe's settings, the lean options and the sampler's."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(class_name="dog"))
    sample: SamplingConfig = field(default_factory=SamplingConfig)
    quantize: str = "none"  # frozen base: none, int8, nf4
    optimizer: str = "adamw"  # adamw, adamw8bit
    gradient_accumulation_steps: int = 1  # micro-batches of batch_size / this per optimizer step
    num_images: int = 4  # images drawn together by `generate` (its -n)

    @property
    def micro_batch(self) -> int:
        return max(1, self.train.batch_size // self.gradient_accumulation_steps)


def decoder_layers(backbone) -> list[torch.nn.Module]:
    """The transformer blocks: the modules holding the attention layers stage 2 adapts."""
    modules = dict(backbone.model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    return [modules[names[id(attn)].rsplit(".", 1)[0]] for attn in backbone.attention_layers()]


def quantize_base(backbone, settings: RunSettings, fake: bool = False) -> None:
    """What loading with --quantize does: the decoder layers' weights in 4 or 8 bits (on the CPU, before
    the model moves to the GPU: not part of any phase's peak)."""
    quantize_layers(decoder_layers(backbone), settings.quantize, copy_layouts=fake)


def training_batch(backbone, placeholder: Placeholder, cfg: TrainConfig, batch: int):
    """A batch shaped like the recipe's: a prompt with [V], the image block, labels on the image tokens.
    (The values do not matter for memory; the shapes are the recipe's.)"""
    layout = backbone.layout
    prefix = len(placeholder.prompt_ids(backbone, PROMPT))
    length = prefix + layout.body_length
    ids = torch.full((batch, length), layout.image_end, dtype=torch.long)
    labels = torch.full((batch, length), getattr(backbone, "logit_offset", 0), dtype=torch.long)  # image code 0
    return ids, labels


def train_phase(backbone, stage: str, settings: RunSettings, steps: int = 2) -> None:
    """Sets the backbone up as the recipe does for `stage` ("embedding" or "layers") and takes `steps`
    optimizer steps. Used on fake tensors (planning) and on real ones (validation)."""
    cfg = settings.train
    generator = torch.Generator().manual_seed(cfg.seed)
    for p in backbone.model.parameters():
        p.requires_grad_(False)
    if stage == "embedding":
        backbone.encode_images(torch.zeros(REFERENCES, 3, backbone.resolution, backbone.resolution))
    placeholder = Placeholder(backbone, cfg, generator)
    layer_params = {}
    if stage != "embedding":
        if cfg.layers == "lora":
            add_lora(backbone, cfg)
            layer_params = lora_params(backbone)
        else:
            layer_params = refuse_quantized(select_layer_params(backbone, cfg))
        for p in layer_params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights, as the recipe keeps them
            p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    autocast = _autocast_for(backbone)
    trainable = [placeholder.embedding, *layer_params.values()]
    optimizer = _optimizer(settings.optimizer, stage_params(stage, placeholder, layer_params, cfg))
    ids, labels = training_batch(backbone, placeholder, cfg, settings.micro_batch)
    for _ in range(steps):
        for _ in range(settings.gradient_accumulation_steps):
            loss = batch_loss(backbone, placeholder, ids, labels, autocast) / settings.gradient_accumulation_steps
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _optimizer(kind: str, groups: list[dict]):
    """The optimizer, its constant tables built with real tensors even inside a fake run (bitsandbytes
    computes its 8-bit quantization maps from Python numbers)."""
    from .tracker import outside_fake

    with outside_fake():
        return make_optimizer(kind, groups)


@torch.no_grad()
def sampling_phase(backbone, settings: RunSettings, window: int = 1) -> None:
    """The sampler's largest moment, then the VQ decoder: a forward pass of `window` new tokens over a KV
    cache that holds the rest of a full image block, for every row of the guided batch."""
    from transformers import DynamicCache

    n = settings.num_images
    rows = n * (2 if settings.sample.cfg_scale != 1.0 else 1)
    prompt = len(backbone.prompt_ids(PROMPT))
    past = prompt + backbone.layout.body_length - window
    config = backbone.model.config.get_text_config(decoder=True)
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = backbone.input_embeddings().weight.dtype
    device = backbone.input_embeddings().weight.device
    cache = DynamicCache()
    for i in range(config.num_hidden_layers):
        k = torch.zeros(rows, heads, past, head_dim, dtype=dtype, device=device)
        cache.update(k, torch.zeros_like(k), i)
    ids = torch.full((rows, window), backbone.layout.image_end, dtype=torch.long)
    positions = torch.arange(past, past + window).expand(rows, window)
    with _autocast_for(backbone)():
        logits, cache = backbone.logits(ids, position_ids=positions, past_key_values=cache)
    logits = logits.float().softmax(-1)  # the processors' distribution over the window
    del cache, logits
    layout = backbone.layout
    backbone.decode_images(torch.zeros(n, layout.rows, layout.cols, dtype=torch.long))
