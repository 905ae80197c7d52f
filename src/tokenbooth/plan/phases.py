"""What each phase of a personalization run does on the device, written once and run two ways: on fake
tensors by the planner (`tokenbooth plan`), on real tensors by the validation benchmark.

  stage1        the references' VQ codes (once), then steps that train [V] alone
  stage2        steps that train [V] and the layers (Q/K/V, or LoRA on them)
  validation    the validation pictures drawn in the middle of the last stage: its weights, trained tensors and
                optimizer state alive, the prompts drawn on the base as it trains (quantized with --quantize)
  sampling-cfg  one image per prompt with the plain sampler: a decoding step at the last position, the KV cache
                full (two rows per image under classifier-free guidance), then the VQ decoder; the base in
                `generate --quantize`'s bits (`RunSettings.sampling_quantize`)
  sampling-sjd  the same with speculative Jacobi decoding: a window of draft tokens per step

A training phase takes two optimizer steps, so the second runs with the first's optimizer state in place; the
first is taken on zero gradients, without the forward and backward passes: it creates the same state, and the
passes it skips hold less than the second step's, which run with that state alive.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..backbones.families import family_defaults
from ..backbones.quantize import quantize_layers
from ..personalize.lean import make_optimizer
from ..personalize.placeholder import PLACEHOLDER
from ..personalize.recipe import (Placeholder, TrainConfig, _autocast_for, enable_gradient_checkpointing, encode_each,
                                  prepare_layers, stage_params, train_layers, train_step)
from ..sampling import SamplingConfig
from ..sampling.draw import decode_each
from .tracker import follow_layers, outside_fake, region, restart_peak, set_region

PROMPT = f"a photo of {PLACEHOLDER} dog on the beach"  # the length of a typical prompt; planning needs no more of it
REFERENCES = 4  # reference images encoded in stage 1's setup (DreamBench has 4-6 per subject)


@dataclass
class RunSettings:
    """Everything a plan varies: the recipe's settings (the lean options among them) and the sampler's."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig.for_family("lumina-mgpt", class_name="dog"))
    sample: SamplingConfig = field(default_factory=lambda: SamplingConfig.for_family("lumina-mgpt"))
    num_images: int = 4  # images drawn together by `generate` (its --batch-size)
    # `generate --quantize`: the base's bits when sampling; None = what generate picks for the adapter this run
    # writes (`sampling_quantize`)
    sample_quantize: str | None = None
    validation_prompts: int = 0  # prompts drawn every --validation-steps (train's --validation-prompt flags)

    @property
    def sampling_quantize(self) -> str:
        """The base's quantization when sampling. By default generate samples on the base the adapter trained
        on (personalize/adapter.py: `sampling_quantization`): [V] and LoRA adapters on their quantized base,
        LoRA unmerged as QLoRA trained it; full Q/K/V always on the full-precision one."""
        if self.sample_quantize is not None:
            return self.sample_quantize
        return self.train.quantize if can_sample_quantized(self.train) else "none"

    def validation_batch(self, family: str) -> int:
        """Validation pictures drawn at once (personalize/validation.py: at most the family's sampling batch)."""
        return min(self.validation_prompts, family_defaults(family).sample_batch_size)


def can_sample_quantized(train: TrainConfig) -> bool:
    """Whether the adapter a run writes can be drawn from a quantized base: [V] alone, or with LoRA (kept
    unmerged over the quantized weights); full layer tensors could not (their change is below the
    quantization step: generate refuses them)."""
    return train.stages == "embedding" or train.layers == "lora"


def quantize_base(backbone, settings: RunSettings, fake: bool = False, kind: str | None = None) -> None:
    """What loading with --quantize does: the decoder layers' weights in 4 or 8 bits (on the CPU, before
    the model moves to the GPU: not part of any phase's peak). kind: the bits, training's by default."""
    quantize_layers(backbone.decoder_layers(), settings.train.quantize if kind is None else kind, copy_layouts=fake)


def training_batch(backbone, placeholder: Placeholder, cfg: TrainConfig):
    """A batch shaped like the recipe's make_batch: a prompt with [V], the image block; labels (image codes)
    everywhere. Values do not matter for memory, shapes do."""
    prefix = len(placeholder.prompt_ids(backbone, PROMPT))
    shape = (cfg.batch_size, prefix + backbone.layout.body_length)
    return torch.full(shape, backbone.layout.image_end, dtype=torch.long), torch.zeros(shape, dtype=torch.long)


def train_phase(backbone, stage: str, settings: RunSettings):
    """Sets the backbone up as the recipe's `train` does for `stage` ("embedding", "layers" or "joint"),
    creates the optimizer's state with a step on zero gradients, then takes a step through the recipe's
    `train_step`. Used on fake tensors (planning) and on real ones (validation). Returns what the run keeps
    alive between steps (the optimizer, and through it the trained tensors)."""
    cfg = settings.train
    if stage == "embedding" or cfg.stages == "joint":  # the references are encoded before the first stage
        with region("encode"):
            encode_each(backbone, torch.zeros(REFERENCES, 3, backbone.resolution, backbone.resolution))
    placeholder, trainable, optimizer = set_up_stage(backbone, stage, cfg, _optimizer)
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
    return optimizer


def validation_phase(backbone, settings: RunSettings) -> None:
    """The validation pictures in the middle of the run's last stage (the one holding the most): a step of
    it, then, with its optimizer state alive, a sampling batch of the validation prompts on the training
    model, as personalize/validation.py draws them. Only the drawing's moments count (`restart_peak`): the
    step's own are the stage's phase."""
    stage = settings.train.plan[-1][0]
    alive = train_phase(backbone, stage, settings)
    restart_peak()
    backbone.model.eval()
    sampling_phase(backbone, settings, window=1, images=settings.validation_batch(backbone.family), autocast=True)
    del alive


def set_up_stage(backbone, stage: str, cfg: TrainConfig, optimizer_factory=make_optimizer):
    """What the recipe's `train` builds for `stage` once the references are encoded: [V], the layer tensors
    (trained from stage 2 on), checkpointing and the optimizer over the stage's groups. Shared by the planner
    and benchmarks/gpu_first_light.py, so both set a stage up as training does. Returns (placeholder, the
    trainable tensors, optimizer)."""
    placeholder = Placeholder(backbone, cfg, torch.Generator().manual_seed(cfg.seed))
    _, layer_params = prepare_layers(backbone, cfg)
    train_layers(layer_params, stage != "embedding")
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    trainable = [placeholder.embedding] + (list(layer_params.values()) if stage != "embedding" else [])
    return placeholder, trainable, optimizer_factory(cfg.optimizer, stage_params(stage, placeholder, layer_params, cfg))


def _optimizer(kind: str, groups: list[dict]):
    """The optimizer, its constant tables built with real tensors even inside a fake run (bitsandbytes
    computes its 8-bit quantization maps from Python numbers)."""
    with outside_fake():
        return make_optimizer(kind, groups)


@torch.no_grad()
def sampling_phase(backbone, settings: RunSettings, window: int = 1, images: int | None = None,
                   autocast: bool = False) -> None:
    """The sampler's largest moment, then the VQ decoder: a forward pass of `window` new tokens over a KV
    cache that holds the rest of a full image block, for every row of the guided batch (of `images`, by
    default generate's batch). The cache is what the sampler's DynamicCache holds at the last token; its
    update then copies one layer's keys and values, as the sampler's does (tests/test_plan.py compares this
    phase with what `draw` allocates). autocast: under the recipe's autocast, as the validation pictures are
    drawn (generate draws without: a bf16 copy of an fp32 model's weights is not made)."""
    n = settings.num_images if images is None else images
    compute = _autocast_for(backbone) if autocast else contextlib.nullcontext
    rows = n * (2 if settings.sample.cfg_scale != 1.0 else 1)
    prompt = len(backbone.prompt_ids(PROMPT))
    past = prompt + backbone.layout.body_length - window
    config = backbone.model.config.get_text_config(decoder=True)
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = backbone.input_embeddings().weight.dtype
    device = backbone.input_embeddings().weight.device
    guided = rows > n
    with region("prefill"), compute():
        # The first pass reads every row's whole prompt (the unconditional rows left-padded to it, so with a
        # mask): on a short image block (mini's) its activations outweigh the full cache at the last token.
        ids = torch.full((rows, prompt), backbone.layout.image_end, dtype=torch.long)
        mask = torch.ones(rows, prompt, dtype=torch.long) if guided else None
        positions = torch.arange(prompt).expand(rows, -1)
        hidden, prefilled = backbone.hidden_states(ids, attention_mask=mask, position_ids=positions,
                                                   cache=DynamicCache())
        backbone.image_head(hidden[:, -1])
        del hidden, prefilled  # the cache below stands for it, grown to the last token
    cache = DynamicCache()
    for i in range(config.num_hidden_layers):
        # The layer made with nothing in it, then given its keys and values as they stand at the last token:
        # `update` would copy them (a moment the sampler, growing token by token, never has)
        nothing = torch.zeros(rows, heads, 0, head_dim, dtype=dtype, device=device)
        cache.update(nothing, nothing, i)
        layer = cache.layers[i]
        layer.keys, layer.values = (torch.zeros(rows, heads, past, head_dim, dtype=dtype, device=device)
                                    for _ in range(2))
    ids = torch.full((rows, window), backbone.layout.image_end, dtype=torch.long)
    positions = torch.arange(past, past + window).expand(rows, window)
    with compute():
        logits, cache = backbone.image_logits(ids, position_ids=positions, cache=cache)
    logits = logits.float().softmax(-1)  # the processors' distribution over the window
    del cache, logits, layer, nothing  # the sampler's cache is gone before the images are decoded
    layout = backbone.layout
    with region("decode"):
        decode_each(backbone, torch.zeros(n, layout.rows, layout.cols, dtype=torch.long))
