"""A personalization run's settings: TrainConfig, the checks that refuse what no run can use, the stage plan.

The stages have one name each in the code: STAGE1 ([V]'s embedding alone learns) and STAGE2 ([V] and the
layers), plus JOINT, both from step 0 (the paper's failing variant). On disk (log records' "stage") they keep
the words the first runs wrote, so that old runs load, resume and log alike:

    STAGE1 = "embedding"    STAGE2 = "layers"    JOINT = "joint"

--stages (the CLI flag, and the "stages" key of train_config.json and adapter_config.json) names a plan of
stages: "two-stage" (STAGE1 then STAGE2, the paper's), "embedding" (STAGE1 alone) or "joint".
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ..backbones.families import family_defaults
from ..errors import UserError
from ..sampling import SamplingConfig
from .lean import check_lean_options
from .placeholder import PLACEHOLDER
from .templates import OBJECT_TEMPLATES

STAGE1 = "embedding"  # the on-disk word for stage 1 (see the table above)
STAGE2 = "layers"  # the on-disk word for stage 2
JOINT = "joint"
STAGE_PLANS = {  # --stages -> the stages it trains, in order
    "two-stage": (STAGE1, STAGE2),
    "embedding": (STAGE1,),
    "joint": (JOINT,),
}
CHECKPOINT_EVERY = 50  # steps between checkpoints, unless --checkpointing-steps says otherwise
COMPUTE_DTYPES = ("model", "bfloat16")


@dataclass(kw_only=True)
class TrainConfig:
    class_name: str | None
    # The per-family hyperparameters have no defaults here: backbones/families.py holds them
    # (`TrainConfig.for_family`), or the caller names them.
    stage1_steps: int
    stage1_lr: float
    stage2_steps: int
    stage2_lr: float
    batch_size: int
    placeholder: str = PLACEHOLDER
    # [V] as this many reserved tokens, each with its own learned embedding (multi-vector Textual Inversion);
    # 1 is the paper's single token
    num_vectors: int = 1
    init_token: str | None = None  # None: random init, as the paper
    stages: str = "two-stage"
    layers: str = "qkv"  # "qkv", "lora", or comma-separated regular expressions over parameter names
    lora_rank: int = 4
    lora_every: int = 1
    flip: bool = False
    seed: int = 0
    checkpointing_steps: int = CHECKPOINT_EVERY
    prior_preservation: bool = False
    num_class_images: int = 8
    prior_loss_weight: float = 1.0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 100
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~30% slower
    # Memory-lean options (lean.py; `tokenbooth plan` tells which a GPU needs):
    gradient_accumulation_steps: int = 1  # each step in this many micro-batches: batch_size / this pairs at once
    quantize: str = "none"  # frozen base in "int8" or "nf4" (with --layers lora: QLoRA)
    optimizer: str = "adamw"  # "adamw8bit": AdamW's two moments in 8 bits
    # "model": compute in the weights' dtype (bf16 for the published models); "bfloat16": bf16 matrix products
    # over fp32 weights (mini on a CPU with AVX512-BF16: about 2.5x faster). Trainable weights stay fp32 either way.
    compute_dtype: str = "model"
    # The gradients of a step are scaled to at most this total norm (a spike in the loss cannot throw [V] far).
    max_grad_norm: float = 1.0
    # AdamW without weight decay: [V]'s row and the projections should stay where the data takes them.
    weight_decay: float = 0.0

    @classmethod
    def for_family(cls, family: str, **overrides) -> "TrainConfig":
        """The family's training defaults (backbones/families.py), with `overrides` on top."""
        return cls(**{"class_name": None, **family_defaults(family).train, **overrides})

    def validate(self) -> None:
        check_train_values(asdict(self))
        if any(self.placeholder in t.replace("{}", "") for t in OBJECT_TEMPLATES):
            raise UserError(f"placeholder {self.placeholder!r} also occurs in the training prompts; pick one like [V]")
        if self.class_name is not None and (not self.class_name.strip() or self.placeholder in self.class_name):
            raise UserError(f"class name {self.class_name!r} must be a word and must not contain the placeholder")

    @property
    def plan(self) -> list[tuple[str, int]]:
        return stage_plan(self.stages, self.stage1_steps, self.stage2_steps)


def stage_plan(stages: str, stage1_steps: int, stage2_steps: int) -> list[tuple[str, int]]:
    """(stage, steps) in order. Joint trains both for the two stages' steps together."""
    steps = {STAGE1: stage1_steps, STAGE2: stage2_steps, JOINT: stage1_steps + stage2_steps}
    return [(s, steps[s]) for s in STAGE_PLANS[stages]]


# What decides stage 1: a run starts from another run's stage 1 only where these agree. Not prior
# preservation: the class prompts hold no [V], so in stage 1 (only [V] learns) the class term has no gradient.
STAGE1_SETTINGS = ("class_name", "placeholder", "num_vectors", "init_token", "stage1_steps", "stage1_lr",
                   "batch_size", "flip", "seed", "gradient_accumulation_steps", "quantize", "optimizer",
                   "compute_dtype", "max_grad_norm", "weight_decay")


def sampling_config(backbone, cfg: TrainConfig) -> SamplingConfig:
    """How the run draws images (class images, validation grids): the family's defaults, recorded in the
    adapter so that `generate --adapter` draws the same way."""
    return SamplingConfig.for_family(backbone.family, seed=cfg.seed)


COUNTS = ("stage1_steps", "stage2_steps", "batch_size", "num_vectors", "lora_rank", "lora_every",
          "checkpointing_steps", "validation_steps", "num_class_images", "gradient_accumulation_steps")
RATES = ("stage1_lr", "stage2_lr")


def check_train_values(values: dict) -> None:
    """Refuses settings no run can use; takes any subset of TrainConfig's fields (None = not given), so a
    command can check its flags before it loads a model."""
    def flag(name):
        return "--" + name.replace("_", "-")

    given = {k: v for k, v in values.items() if v is not None}
    if "stages" in given and given["stages"] not in STAGE_PLANS:
        raise UserError(f"--stages must be one of {', '.join(STAGE_PLANS)} (got {given['stages']!r})")
    if "init_token" in given and not given["init_token"].strip():
        raise UserError("--init-token must be a word (leave it out for the paper's random start)")
    placeholder = given.get("placeholder")
    if placeholder is not None and (not placeholder.strip() or any(c.isspace() for c in placeholder)):
        raise UserError(f"placeholder {placeholder!r} must be a non-empty string without spaces")
    for name in COUNTS:
        if name in given and not given[name] >= 1:
            raise UserError(f"{flag(name)} must be >= 1 (got {given[name]})")
    for name in (*RATES, "prior_loss_weight", "max_grad_norm", "weight_decay"):
        value, at_least_zero = given.get(name), name in ("prior_loss_weight", "weight_decay")
        if value is not None and not (math.isfinite(value) and (value > 0 or at_least_zero and value >= 0)):
            raise UserError(f"{flag(name)} must be a finite number {'>= 0' if at_least_zero else '> 0'} "
                            f"(got {value})")
    if given.get("layers") not in (None, "qkv", "lora"):
        layer_patterns(given["layers"])
    if given.get("compute_dtype", "model") not in COMPUTE_DTYPES:
        raise UserError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {given['compute_dtype']!r})")
    accumulation, batch = given.get("gradient_accumulation_steps"), given.get("batch_size")
    if accumulation and batch and batch % accumulation:
        raise UserError(f"--gradient-accumulation-steps {accumulation} must divide --batch-size {batch} (equal "
                        f"micro-batches give the big batch's gradient)")
    trains_layers = given.get("stages") != "embedding"  # --stages embedding: STAGE1 alone, no layers to check
    check_lean_options(given.get("quantize", "none"), given.get("optimizer", "adamw"),
                       given.get("layers", "qkv") if trains_layers else "")


def layer_patterns(layers: str) -> list[re.Pattern]:
    """--layers as regular expressions over parameter names: the one place that parses them."""
    patterns = []
    for text in (p.strip() for p in layers.split(",")):
        if text:
            try:
                patterns.append(re.compile(text))
            except re.error as e:
                raise UserError(f"--layers: {text!r} is not a regular expression ({e})") from None
    if not patterns:
        raise UserError(f"--layers {layers!r} names no parameter (qkv, lora, or comma-separated regexes)")
    return patterns
