"""What each phase of a personalization run does on the device, written once and run two ways: on fake
tensors by the planner (`tokenbooth plan`), on real tensors by the validation benchmark.

  stage1        the references' VQ codes (once), then steps that train [V] alone
  stage2        steps that train [V] and the layers (Q/K/V, or LoRA on them)
  sampling-cfg  one image per prompt with the plain sampler: a decoding step at the last position, the KV cache
                full (two rows per image under classifier-free guidance), then the VQ decoder
  sampling-sjd  the same with speculative Jacobi decoding: a window of draft tokens per step

A training phase takes two optimizer steps, so the second runs with the first's optimizer state in place; the
first is taken on zero gradients, without the forward and backward passes: it creates the same state, and the
passes it skips hold less than the second step's, which run with that state alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..backbones.quantize import quantize_layers
from ..personalize.lean import make_optimizer
from ..personalize.placeholder import PLACEHOLDER
from ..personalize.recipe import (Placeholder, TrainConfig, _autocast_for, enable_gradient_checkpointing, encode_each,
                                  prepare_layers, stage_params, train_layers, train_step)
from ..sampling import SamplingConfig
from ..sampling.draw import decode_each
from .tracker import follow_layers, outside_fake, region, set_region

PROMPT = f"a photo of {PLACEHOLDER} dog on the beach"  # the length of a typical prompt; planning needs no more of it
REFERENCES = 4  # reference images encoded in stage 1's setup (DreamBench has 4-6 per subject)


@dataclass
class RunSettings:
    """Everything a plan varies: the recipe's settings (the lean options among them) and the sampler's."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig.for_family("lumina-mgpt", class_name="dog"))
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig.for_family("lumina-mgpt"))
    num_images: int = 4  # images drawn together by `generate` (its --batch-size)


def quantize_base(backbone, settings: RunSettings, fake: bool = False) -> None:
    """What loading with --quantize does: the decoder layers' weights in 4 or 8 bits (on the CPU, before
    the model moves to the GPU: not part of any phase's peak)."""
    quantize_layers(backbone.decoder_layers(), settings.train.quantize, copy_layouts=fake)


def training_batch(backbone, placeholder: Placeholder, cfg: TrainConfig):
    """A batch shaped like the recipe's make_batch: a prompt with [V], the image block; labels (image codes)
    everywhere. Values do not matter for memory, shapes do."""
    prefix = len(placeholder.prompt_ids(backbone, PROMPT))
    shape = (cfg.batch_size, prefix + backbone.layout.body_length)
    return torch.full(shape, backbone.layout.image_end, dtype=torch.long), torch.zeros(shape, dtype=torch.long)


def train_phase(backbone, stage: str, settings: RunSettings) -> None:
    """Sets the backbone up as the recipe's `train` does for `stage` ("embedding", "layers" or "joint"),
    creates the optimizer's state with a step on zero gradients, then takes a step through the recipe's
    `train_step`. Used on fake tensors (planning) and on real ones (validation)."""
    cfg = settings.train
    generator = torch.Generator().manual_seed(cfg.seed)
    if stage == "embedding" or cfg.stages == "joint":  # the references are encoded before the first stage
        with region("encode"):
            encode_each(backbone, torch.zeros(REFERENCES, 3, backbone.resolution, backbone.resolution))
    placeholder = Placeholder(backbone, cfg, generator)
    _, layer_params = prepare_layers(backbone, cfg)
    train_layers(layer_params, stage != "embedding")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    trainable = [placeholder.embedding] + (list(layer_params.values()) if stage != "embedding" else [])
    optimizer = _optimizer(cfg.optimizer, stage_params(stage, placeholder, layer_params, cfg))
    follow_layers(backbone.decoder_layers())
    optimizer.register_step_pre_hook(lambda *_: set_region("optimizer") and None)
    optimizer.register_step_post_hook(lambda *_: set_region("step") and None)
    batch = (*training_batch(backbone, placeholder, cfg), 1.0)
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with region("step"):
        train_step(backbone, placeholder, [batch], cfg, optimizer, trainable, _autocast_for(backbone))


def _optimizer(kind: str, groups: list[dict]):
    """The optimizer, its constant tables built with real tensors even inside a fake run (bitsandbytes
    computes its 8-bit quantization maps from Python numbers)."""
    with outside_fake():
        return make_optimizer(kind, groups)


@torch.no_grad()
def sampling_phase(backbone, settings: RunSettings, window: int = 1) -> None:
    """The sampler's largest moment, then the VQ decoder: a forward pass of `window` new tokens over a KV
    cache that holds the rest of a full image block, for every row of the guided batch."""
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
        logits, cache = backbone.image_logits(ids, position_ids=positions, cache=cache)
    logits = logits.float().softmax(-1)  # the processors' distribution over the window
    del cache, logits
    layout = backbone.layout
    with region("decode"):
        decode_each(backbone, torch.zeros(n, layout.rows, layout.cols, dtype=torch.long))
