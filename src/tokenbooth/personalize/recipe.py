"""The two-stage personalization recipe of Sun et al. 2025, for any backbone.

  setup     reference images -> VQ tokens (once), placeholder [V] on a reserved vocabulary row
  stage 1   only [V]'s embedding learns: cross-entropy on the image tokens, Textual-Inversion prompts
  stage 2   [V] keeps learning and transformer layers join (Q/K/V of every layer, or LoRA on them)
  save      an adapter folder (adapter.py); checkpoints on the way make the run resumable

A two-stage run can also start from another run's finished stage 1 (`train(stage1_from=...)`), as if it
had trained that stage itself: toy-bench trains stage 1 once per subject and branches every stage-2
variant from it.

Training both at once from the start (`stages="joint"`) is the paper's failing variant, kept for the
ablation: the layers absorb the subject and [V] stays undertrained.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, warn
from ..io import atomic_path, atomic_save_image, atomic_write_json, read_json_object, read_jsonl
from ..vq import pil_to_tensor
from . import adapter as adapter_files
from .lean import make_optimizer
from .sharded import Sharding, clip_gradients, full, load_optimizer, whole_optimizer_state
from .templates import OBJECT_TEMPLATES, training_prompt

STAGE_PLANS = {
    "two-stage": ("embedding", "layers"),
    "embedding": ("embedding",),
    "joint": ("joint",),
}
QKV = ("q_proj", "k_proj", "v_proj")


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
    placeholder: str = "[V]"
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
    checkpointing_steps: int = 50
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

    @classmethod
    def for_family(cls, family: str, **overrides) -> "TrainConfig":
        """The family's training defaults (backbones/families.py), with `overrides` on top."""
        from ..backbones.families import family_defaults

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
    steps = {"embedding": stage1_steps, "layers": stage2_steps, "joint": stage1_steps + stage2_steps}
    return [(s, steps[s]) for s in STAGE_PLANS[stages]]


COUNTS = ("stage1_steps", "stage2_steps", "batch_size", "num_vectors", "lora_rank", "lora_every",
          "checkpointing_steps", "validation_steps", "num_class_images", "gradient_accumulation_steps")
RATES = ("stage1_lr", "stage2_lr")
COMPUTE_DTYPES = ("model", "bfloat16")


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
    for name in (*RATES, "prior_loss_weight"):
        value = given.get(name)
        if value is not None and not (math.isfinite(value) and (value > 0 or name == "prior_loss_weight" and value >= 0)):
            raise UserError(f"{flag(name)} must be a finite number {'>= 0' if name == 'prior_loss_weight' else '> 0'} "
                            f"(got {value})")
    if given.get("layers") not in (None, "qkv", "lora"):
        layer_patterns(given["layers"])
    if given.get("compute_dtype", "model") not in COMPUTE_DTYPES:
        raise UserError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {given['compute_dtype']!r})")
    accumulation, batch = given.get("gradient_accumulation_steps"), given.get("batch_size")
    if accumulation and batch and batch % accumulation:
        raise UserError(f"--gradient-accumulation-steps {accumulation} must divide --batch-size {batch} (equal "
                        f"micro-batches give the big batch's gradient)")
    from .lean import check_lean_options

    check_lean_options(given.get("quantize", "none"), given.get("optimizer", "adamw"),
                       given.get("layers", "qkv") if given.get("stages") != "embedding" else "")


def layer_patterns(layers: str) -> list[re.Pattern]:
    """--layers as regular expressions over parameter names."""
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


def check_class_name(backbone, class_name: str | None) -> None:
    """The class word must tokenize without unknown pieces: a prompt the model cannot read teaches nothing."""
    if class_name:
        ids = backbone.tokenizer.encode(class_name, add_special_tokens=False).ids
        unk = backbone.tokenizer.token_to_id("<unk>")
        if not ids or (unk is not None and unk in ids):
            raise UserError(f"the tokenizer of {backbone.name} cannot encode the class name {class_name!r}")


# --- setup ------------------------------------------------------------------------------------------

def placeholder_tokens(backbone, num_vectors: int) -> list[str]:
    """The reserved tokens [V] stands for: the first `num_vectors` free ones."""
    candidates = backbone.placeholder_candidates()
    if len(candidates) < num_vectors:
        raise UserError(f"{backbone.name} has {len(candidates)} free vocabulary row(s) for the placeholder, "
                        f"--num-vectors asks for {num_vectors}")
    return candidates[:num_vectors]


class Placeholder:
    """[V]: reserved vocabulary rows (one unless --num-vectors) whose embeddings are the one thing stage 1
    learns. The embedding is one vector for a single token (the paper's, and the adapter format's since the
    start), a (num_vectors, width) matrix otherwise."""

    def __init__(self, backbone, cfg: TrainConfig, generator: torch.Generator):
        self.tokens = placeholder_tokens(backbone, cfg.num_vectors)
        self.text, self.token = cfg.placeholder, "".join(self.tokens)  # the prompt's [V] becomes all of them
        self.token_ids = [backbone.tokenizer.token_to_id(t) for t in self.tokens]
        table = backbone.input_embeddings().weight.detach()
        shape = (table.shape[1],) if cfg.num_vectors == 1 else (cfg.num_vectors, table.shape[1])
        if cfg.init_token:
            ids = backbone.tokenizer.encode(cfg.init_token, add_special_tokens=False).ids
            if not ids:
                raise UserError(f"--init-token {cfg.init_token!r} has no tokens")
            init = table[ids].float().mean(0).expand(shape)
        else:  # random, at the scale of the existing rows
            init = torch.randn(shape, generator=generator).to(table.device) * _std(table)
        # fp32 master copy even when the model is bf16, on the table's device
        self.embedding = torch.nn.Parameter(init.float().clone())

    @property
    def rows(self) -> torch.Tensor:
        """(num_vectors, width): one row per reserved token."""
        return self.embedding.reshape(len(self.token_ids), -1)

    def embed(self, backbone, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with [V]'s rows taken from the trainable copy."""
        embeds = backbone.embed(ids)
        ids = ids.to(embeds.device)
        for token_id, row in zip(self.token_ids, self.rows):
            embeds = torch.where((ids == token_id)[..., None], row.to(embeds.dtype), embeds)
        return embeds

    def prompt_ids(self, backbone, prompt: str) -> list[int]:
        return backbone.prompt_ids(adapter_files.substitute_placeholder(prompt, self.text, self.token))


def _std(table: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """The table's standard deviation in fp32, a block of rows at a time: no fp32 copy of the whole table
    (1 GB for Lumina-mGPT's 65,536 x 4096)."""
    mean = sum(block.float().sum() for block in table.split(rows)) / table.numel()
    return (sum(((block.float() - mean) ** 2).sum() for block in table.split(rows)) / (table.numel() - 1)).sqrt()


def reference_tokens(backbone, images, flip: bool) -> torch.Tensor:
    """VQ codes of every reference (and its mirror image when flipping): computed once, not every step."""
    pixels = pil_to_tensor(images)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return encode_each(backbone, pixels)


def encode_each(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """VQ codes one image at a time: the encoder's full-resolution fp32 activations of a whole batch of 768-px
    references would take more memory than training (about 1.2 GB per feature map for 4 images)."""
    return torch.cat([backbone.encode_images(p[None]) for p in pixels])


def class_tokens(backbone, cfg: TrainConfig, out: Path) -> torch.Tensor:
    """Prior preservation (DreamBooth): the base model's own images of the class, drawn once and cached."""
    from safetensors.torch import load_file, save_file

    from ..sampling import draw_codes

    path = out / "class_tokens.safetensors"
    if path.exists():
        codes = load_file(str(path))["codes"]
        if len(codes) >= cfg.num_class_images:
            return codes[: cfg.num_class_images]
    prompts = [training_prompt(i, cfg.class_name or "", None) for i in range(cfg.num_class_images)]
    codes = draw_codes(backbone, prompts, sampling_config(backbone, cfg))
    with atomic_path(path) as tmp:
        save_file({"codes": codes.contiguous()}, str(tmp))
    return codes


def sampling_config(backbone, cfg: TrainConfig):
    """How the run draws images (class images, validation grids): the family's defaults, recorded in the
    adapter so that `generate --adapter` draws the same way."""
    from ..sampling import SamplingConfig

    return SamplingConfig.for_family(backbone.family, seed=cfg.seed)


def select_layer_params(backbone, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Stage 2's targets, by parameter name, among the backbone's `trainable_parameters` (never its image
    tokenizer or vision encoder)."""
    named = backbone.trainable_parameters()
    if cfg.layers == "qkv":
        wanted = {f"{prefix}.{proj}.weight" for prefix in _attention_prefixes(backbone) for proj in QKV}
        chosen = {n: p for n, p in named.items() if n in wanted}
    else:
        patterns = []
        for text in filter(None, (p.strip() for p in cfg.layers.split(","))):
            try:
                patterns.append(re.compile(text))
            except re.error as e:
                raise UserError(f"--layers {text!r} is not a regular expression: {e}") from None
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
    from peft import LoraConfig, inject_adapter_in_model

    trainable = backbone.trainable_parameters()
    targets = [f"{prefix}.{proj}" for prefix in _attention_prefixes(backbone)[:: cfg.lora_every] for proj in QKV
               if f"{prefix}.{proj}.weight" in trainable]
    lora_config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices start random: the same seed gives the same run
    with warnings.catch_warnings():
        # On a quantized base (QLoRA) peft warns that its TorchaoLoraLinear cannot merge(): tokenbooth merges an
        # adapter into the bf16 model only, never into the quantized one it trained on.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated", category=UserWarning)
        inject_adapter_in_model(lora_config, backbone.model)
    return lora_config


def lora_params(backbone) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in backbone.model.named_parameters() if ".lora_" in n}


# --- batches and loss -----------------------------------------------------------------------------

def make_batch(backbone, placeholder: Placeholder, cfg: TrainConfig, codes: torch.Tensor, generator, subject: bool):
    """`batch_size` (prompt, image) pairs: token ids (B, T), and labels (B, T) holding the image code at every
    image position and -100 (ignored) on the prompt, header and structure tokens."""
    n = cfg.batch_size if subject else max(1, cfg.batch_size // 2)
    picks = torch.randint(len(codes), (n,), generator=generator).tolist()
    templates = torch.randint(len(OBJECT_TEMPLATES), (n,), generator=generator).tolist()
    layout = backbone.layout
    seqs, labels = [], []
    for pick, template in zip(picks, templates):
        if subject:
            prompt = training_prompt(template, cfg.placeholder, cfg.class_name)
        else:
            prompt = training_prompt(template, cfg.class_name or "", None)
        prefix = placeholder.prompt_ids(backbone, prompt)
        image = codes[pick : pick + 1]
        seqs.append(prefix + layout.body_from_codes(image)[0].tolist())
        labels.append([-100] * len(prefix) + layout.body_labels(image)[0].tolist())
    width = max(map(len, seqs))
    ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])  # right padding is never attended to
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, lab


LOSS_CHUNK_TOKENS = 4096  # image-head rows per loss chunk: (4096, K) fp32 logits alive at a time, 134 MB for K = 8192


def batch_loss(backbone, placeholder: Placeholder, ids, labels, autocast, chunk_tokens: int = LOSS_CHUNK_TOKENS
               ) -> torch.Tensor:
    """Mean cross-entropy of the next image code, over the image codes only.

    The softmax runs over the K codes of `image_head`, not the whole vocabulary. That is Janus-Pro's own loss
    (its generation head has no text columns) and, for Lumina-mGPT, the log-likelihood of what its sampler
    actually draws (text tokens are masked at image positions); it differs from the full-vocabulary
    cross-entropy Lumina-mGPT trains with by the mass that softmax gives text tokens, which sampling never
    uses. It also skips 7/8 of Chameleon's output layer.

    The hidden states are computed once; the head and the cross-entropy run over chunks of about
    `chunk_tokens` positions, each under activation checkpointing, so the (batch, sequence, K) logits never
    exist whole, in the forward pass or the backward (Lumina-mGPT 768, batch 8: 0.27 GB a chunk instead of
    5 GB at once). Prompt positions go through the head too and are ignored by the loss (-100): about 2% more
    head work, and no shape that depends on the labels' values."""
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    with autocast():
        hidden, _ = backbone.hidden_states(inputs_embeds=placeholder.embed(backbone, ids))
    hidden = hidden[:, :-1]
    targets = targets.to(hidden.device)
    width = max(1, chunk_tokens // hidden.shape[0])

    def chunk_loss(h, t):
        with autocast():
            logits = backbone.image_head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")

    total = sum(checkpoint(chunk_loss, hidden[:, i:i + width], targets[:, i:i + width], use_reentrant=False)
                for i in range(0, hidden.shape[1], width))
    return total / (targets >= 0).sum()


# --- before the run -------------------------------------------------------------------------------

RUN_FILE = "train_config.json"  # {"config": the TrainConfig, "source": ...}: --resume continues exactly that run


def check_run(backbone, cfg: TrainConfig, out: Path, resume: bool, sharding=None, stage1_from: Path | None = None
              ) -> None:
    """Everything that would stop the run, checked before it writes anything: the settings, the class word,
    the --layers targets, the sequence length, what `out` already holds, and the stage 1 it starts from."""
    from ..io import check_can_create

    cfg.validate()
    if sharding is not None:
        sharding.check(cfg.batch_size, cfg.gradient_accumulation_steps)
        if cfg.optimizer != "adamw" or cfg.quantize != "none" or cfg.prior_preservation:
            raise UserError("a sharded run (several processes) trains with --optimizer adamw on an unquantized "
                            "base, without --prior-preservation (FSDP already splits AdamW's state over the GPUs)")
    check_class_name(backbone, cfg.class_name)
    if cfg.layers != "lora":
        select_layer_params(backbone, cfg)
    check_training_fits(backbone, cfg)
    check_can_create(out, "output folder", folder=True)
    if resume:
        saved, _ = read_run(out)
        if latest_checkpoint(out) is None:
            raise UserError(f"nothing to resume in {out} (no checkpoints/step-N)")
        changed = [k for k, v in asdict(cfg).items() if getattr(saved, k) != v]
        if changed:
            raise UserError(f"{out} holds a run with {changed[0]} {getattr(saved, changed[0])!r}, not "
                            f"{getattr(cfg, changed[0])!r}; resume with the run's own settings")
    elif (out / adapter_files.CONFIG).exists():
        raise UserError(f"{out} already holds an adapter; choose another output folder")
    elif latest_checkpoint(out) is not None:
        raise UserError(f"{out} holds an unfinished run; resume it (train --resume) or choose another output folder")
    if stage1_from is not None and not resume:
        stage1_checkpoint(backbone, cfg, Path(stage1_from))
    if sharding is not None:
        sharding.barrier()  # every process has looked at `out` before the first one writes there


# What decides stage 1: a run starts from another run's stage 1 only where these agree. Not prior
# preservation: the class prompts hold no [V], so in stage 1 (only [V] learns) the class term has no gradient.
STAGE1_SETTINGS = ("class_name", "placeholder", "num_vectors", "init_token", "stage1_steps", "stage1_lr",
                   "batch_size", "flip", "seed", "gradient_accumulation_steps", "quantize", "optimizer",
                   "compute_dtype")


def stage1_checkpoint(backbone, cfg: TrainConfig, folder: Path) -> Path:
    """The checkpoint that ends stage 1 in `folder` (every run keeps it), refused unless that stage 1 is the
    one `cfg` would train, on the same base."""
    if cfg.stages != "two-stage":
        raise UserError(f"only a two-stage run can start from a finished stage 1 (this one is {cfg.stages})")
    if not (folder / RUN_FILE).is_file():
        raise UserError(f"{folder} holds no training run to take stage 1 from (no {RUN_FILE})")
    saved, _ = read_run(folder)
    for name in STAGE1_SETTINGS:
        if getattr(saved, name) != getattr(cfg, name):
            raise UserError(f"the stage 1 in {folder} was trained with {name} {getattr(saved, name)!r}, this run "
                            f"asks for {getattr(cfg, name)!r}")
    if (folder / adapter_files.CONFIG).is_file():
        recorded = read_json_object(folder / adapter_files.CONFIG, "adapter config").get("base_fingerprint")
        if recorded != adapter_files.base_fingerprint(backbone.folder):
            raise UserError(f"the stage 1 in {folder} was trained on another base model than {backbone.name}")
    checkpoint = folder / "checkpoints" / f"step-{cfg.stage1_steps}"
    if not (checkpoint / "progress.json").is_file():
        raise UserError(f"{folder} holds no finished stage 1 (no checkpoints/step-{cfg.stage1_steps})")
    return checkpoint


def start_from_stage1(checkpoint: Path, out: Path) -> None:
    """Copies a finished stage 1 (its checkpoint, and its loss and fidelity log lines) into `out`: the run then
    goes on as one resumed at the end of its own stage 1, and `train --resume` can continue it like any other."""
    import os
    import shutil

    step = int(checkpoint.name.split("-")[1])
    tmp = out / "checkpoints" / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    os.replace(tmp, out / "checkpoints" / checkpoint.name)
    for name in ("log.jsonl", FIDELITY_LOG):
        log = checkpoint.parent.parent / name
        if log.exists():
            # an embedding-only run's "final" grid is its [V] at the end of stage 1, where this run goes on
            records = [{**r, "stage": "embedding"} if r.get("stage") == "final" else r
                       for r in read_jsonl(log) if r["step"] <= step]
            with atomic_path(out / name) as tmp_log:
                tmp_log.write_text("".join(json.dumps(r) + "\n" for r in records))


def check_training_fits(backbone, cfg: TrainConfig) -> None:
    """The longest training sequence (prompt, then the image) must fit the model's context, as `generate`
    checks for its prompt: past it a large model runs out of memory instead of saying why. So must the
    validation prompts."""
    from ..sampling.sampler import check_prompt_fits

    token = "".join(placeholder_tokens(backbone, cfg.num_vectors))
    ids = lambda prompt: backbone.prompt_ids(adapter_files.substitute_placeholder(prompt, cfg.placeholder, token))  # noqa: E731
    prompts = [training_prompt(i, cfg.placeholder, cfg.class_name) for i in range(len(OBJECT_TEMPLATES))]
    lengths = [len(ids(p)) for p in prompts]
    needed = max(lengths) + backbone.layout.body_length
    if needed > backbone.max_length:
        longest = prompts[lengths.index(max(lengths))]
        raise UserError(f"training sequences too long for {backbone.name}: {longest!r} and its image need {needed} "
                        f"tokens, the context holds {backbone.max_length} (shorten the class name)")
    for prompt in cfg.validation_prompts:  # drawn during the run: found too long only after training otherwise
        check_prompt_fits(backbone, ids(prompt))


def read_run(out: Path) -> tuple[TrainConfig, dict]:
    """The settings and source of the run in `out` (train_config.json), for resuming it."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise UserError(f"nothing to resume in {out} (no {RUN_FILE})")
    saved = read_json_object(path, "run settings")
    if "config" not in saved:  # written before the source was recorded: the config alone
        saved = {"config": saved}
    try:
        return TrainConfig(**saved["config"]), dict(saved.get("source") or {})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} does not describe a run: {e}") from None


# --- the run ----------------------------------------------------------------------------------------

@dataclass
class RunState:
    stage_index: int = 0
    step: int = 0  # within the stage
    global_step: int = 0


def enable_gradient_checkpointing(backbone) -> None:
    """transformers' per-layer checkpointing (non-reentrant, so a frozen model with a trainable input
    embedding still gets gradients). It only acts on layers in training mode; the networks have no dropout
    in the layers personalization runs, so train mode changes nothing else."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(backbone.model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in backbone.model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.train()


def _autocast_for(backbone, compute_dtype: str = "model"):
    dtype = next(backbone.model.parameters()).dtype if compute_dtype == "model" else getattr(torch, compute_dtype)
    device = next(backbone.model.parameters()).device.type
    if dtype == torch.float32:
        return lambda: torch.autocast(device, enabled=False)
    return lambda: torch.autocast(device, dtype=dtype)  # trainable fp32 copies, bf16 compute


def prepare_layers(backbone, cfg: TrainConfig):
    """Freezes the model, quantizes its frozen base if asked (lean.py; a no-op on a base loaded quantized) and
    picks stage 2's parameters: LoRA injected on Q/K/V, or the named weights. Returns (lora config or None,
    {name: parameter}). The picked weights stay in the model's dtype until a stage trains them (`train_layers`)."""
    from .lean import decoder_layers, quantize_layers, refuse_quantized

    for p in backbone.model.parameters():
        p.requires_grad_(False)
    quantize_layers(decoder_layers(backbone), cfg.quantize)
    if cfg.stages == "embedding":
        return None, {}
    if cfg.layers == "lora":
        lora_config = add_lora(backbone, cfg)
        return lora_config, lora_params(backbone)
    return None, refuse_quantized(select_layer_params(backbone, cfg))


def train_layers(layer_params: dict, train: bool) -> None:
    """Layers join (stage 2, joint) as fp32 master weights, autocast computing in the model's dtype; stage 1
    leaves them as they are, in the model's dtype, and frozen."""
    for p in layer_params.values():
        if train and p.dtype != torch.float32:
            p.data = p.data.float()
        p.requires_grad_(train)


def train_step(backbone, placeholder: Placeholder, batches: list, cfg: TrainConfig, optimizer, trainable: list,
               autocast, check_loss=None, sharding=None) -> torch.Tensor:
    """One optimizer step. `batches`: [(ids, labels, weight)], the subject's pairs and (prior preservation) the
    class's; each is split into `cfg.gradient_accumulation_steps` micro-batches whose gradients add up to the
    whole batch's (every pair holds the same number of image tokens, so the micro-batch means weigh equally).
    `check_loss(loss)` sees each micro-batch's loss before its backward pass. Gradients are released after
    the step, so the next forward pass runs without them. In a sharded run (sharded.py) `batches` are this
    process's share and [V]'s gradient is averaged over the processes. Returns the step's loss."""
    total = 0.0
    for ids, labels, weight in batches:
        parts = list(zip(ids.chunk(cfg.gradient_accumulation_steps), labels.chunk(cfg.gradient_accumulation_steps)))
        for part_ids, part_labels in parts:
            loss = weight * batch_loss(backbone, placeholder, part_ids, part_labels, autocast) / len(parts)
            if check_loss is not None:
                check_loss(loss)
            loss.backward()
            total = total + loss.detach()
    if sharding is not None:
        sharding.average(placeholder.embedding.grad)
    clip_gradients(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def stage_params(stage: str, placeholder: Placeholder, layer_params: dict, cfg: TrainConfig):
    """Optimizer parameter groups of a stage."""
    if stage == "embedding":
        return [{"params": [placeholder.embedding], "lr": cfg.stage1_lr}]
    if stage == "layers":
        return [{"params": [placeholder.embedding], "lr": cfg.stage2_lr},
                {"params": list(layer_params.values()), "lr": cfg.stage2_lr}]
    return [{"params": [placeholder.embedding], "lr": cfg.stage1_lr},  # joint: both from step 0
            {"params": list(layer_params.values()), "lr": cfg.stage2_lr}]


def train(backbone, images, cfg: TrainConfig, out: Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, source: dict | None = None, sharding: Sharding | None = None,
          stage1_from: Path | None = None) -> Path:
    """Personalizes `backbone` on `images`; writes the adapter to `out` and returns it.

    stop_after: end the run (checkpoint written) after this many steps in all, as an interruption would.
    source: what the caller wants recorded about where the run came from (the command: model, image folder).
    sharding: this process's place in a run over several processes (`Sharding.from_environment()` under
    `accelerate launch`; sharded.py); None trains alone, as each of DreamBench's processes does.
    stage1_from: the folder of a run (an embedding-only one, say) whose finished stage 1 this two-stage run
    takes instead of training its own; the adapter is then the one the uninterrupted run would give. Not
    used when resuming: `out` already holds a copy."""
    out = Path(out)
    check_run(backbone, cfg, out, resume, sharding, stage1_from)  # every refusal comes before anything is written
    main = sharding is None or sharding.main  # the process that writes files
    generator = torch.Generator().manual_seed(cfg.seed)
    placeholder = Placeholder(backbone, cfg, generator)
    codes = reference_tokens(backbone, images, cfg.flip)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and main:
        atomic_write_json(out / RUN_FILE, {"config": asdict(cfg), "source": source or {}})
    prior = class_tokens(backbone, cfg, out) if cfg.prior_preservation else None

    lora_config, layer_params = prepare_layers(backbone, cfg)

    if stage1_from is not None and not resume:
        if main:
            start_from_stage1(stage1_checkpoint(backbone, cfg, Path(stage1_from)), out)
        if sharding is not None:
            sharding.barrier()  # the copy is whole before any process reads it
        resume = True  # from here on, the run is one resumed at the end of its stage 1
    state = RunState()
    checkpoint = latest_checkpoint(out) if resume else None
    saved = load_checkpoint(checkpoint, placeholder, layer_params, generator, state) if checkpoint else None

    autocast = _autocast_for(backbone, cfg.compute_dtype)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    log_path = out / "log.jsonl"
    if main:
        _truncate_log(log_path, state.global_step)  # an interrupted run may have logged past its last checkpoint
        _truncate_log(out / FIDELITY_LOG, state.global_step)
    # only the process that writes files scores (log_fidelity does nothing without a scorer)
    fidelity = fidelity_scorer(backbone, images) if cfg.validation_prompts and main else None
    for stage_index, (stage, steps) in enumerate(cfg.plan):
        if stage_index < state.stage_index:
            continue
        train_layers(layer_params, stage != "embedding")
        if sharding is not None and stage != "embedding":
            layer_params = sharding.shard(backbone, layer_params)
        trainable = [placeholder.embedding] + (list(layer_params.values()) if stage != "embedding" else [])
        optimizer = make_optimizer(cfg.optimizer, stage_params(stage, placeholder, layer_params, cfg))
        if saved is not None and stage_index == state.stage_index and saved.get("optimizer"):
            load_optimizer(optimizer, saved["optimizer"])
        saved = None
        if stage_index > state.stage_index:
            state.stage_index, state.step = stage_index, 0
        bar = _bar(steps, state.step, f"stage {stage_index + 1}/{len(cfg.plan)} ({stage})", progress)
        t0 = time.time()
        while state.step < steps:
            batches = [(*make_batch(backbone, placeholder, cfg, codes, generator, subject=True), 1.0)]
            if prior is not None:
                batches.append((*make_batch(backbone, placeholder, cfg, prior, generator, subject=False),
                                cfg.prior_loss_weight))
            if sharding is not None:  # every process drew the same pairs; each trains on its share
                batches = [(*sharding.local(ids, labels), weight) for ids, labels, weight in batches]

            def check_loss(loss, step=state.global_step + 1):
                if not math.isfinite(loss.item()):
                    last = latest_checkpoint(out)
                    raise UserError(f"loss became {loss.item()} at step {step}; stopped"
                                    + (f" (last good checkpoint: {last})" if last else "") + "; try a lower learning rate")

            loss = train_step(backbone, placeholder, batches, cfg, optimizer, trainable, autocast, check_loss, sharding)
            if sharding is not None:
                sharding.average(loss)  # the whole batch's loss, as one process would log it
            state.step += 1
            state.global_step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if main:
                _append_log(log_path, {"step": state.global_step, "stage": stage, "loss": round(loss.item(), 5),
                                       "seconds": round(time.time() - t0, 3)})
            t0 = time.time()
            finished = state.step == steps and stage_index == len(cfg.plan) - 1
            # The end of stage 1 is always kept: [V] and its optimizer state alone (layers have not trained
            # yet), a few KB, from which another two-stage run can start (stage1_from).
            stage1_done = stage == "embedding" and state.step == steps
            if state.global_step % cfg.checkpointing_steps == 0 or state.global_step == stop_after or stage1_done:
                save_checkpoint(out, state, placeholder, layer_params, optimizer, generator, sharding)
            if cfg.validation_prompts and state.global_step % cfg.validation_steps == 0 and not finished:
                pictures = render_validation(backbone, placeholder, cfg,
                                             out / "validation" / f"step-{state.global_step}.png", write=main)
                log_fidelity(out, fidelity, pictures, state.global_step, stage)
            if state.global_step == stop_after and not finished:
                bar.close()
                backbone.model.eval()
                return out
        bar.close()

    backbone.model.eval()  # checkpointing put layers in training mode; sampling wants them as they were
    save_final_adapter(backbone, placeholder, layer_params, lora_config, cfg, out, write=main)
    if cfg.validation_prompts:
        pictures = render_validation(backbone, placeholder, cfg, out / "validation" / "final.png", write=main)
        log_fidelity(out, fidelity, pictures, state.global_step, "final")
    if main:
        write_loss_plot(log_path, out / "loss.png")
    if sharding is not None:
        sharding.barrier()  # the adapter is whole on disk before any process returns
    return out


def _bar(total: int, done: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, unit="step", disable=not enabled)


def _truncate_log(path: Path, last_step: int) -> None:
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _append_log(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# --- checkpoints --------------------------------------------------------------------------------------

def save_checkpoint(out: Path, state: RunState, placeholder: Placeholder, layer_params: dict, optimizer, generator,
                    sharding=None):
    """checkpoints/step-N/: trainable tensors, optimizer and RNG state. The folder appears complete or not
    at all (written beside, then renamed). A sharded run gathers whole tensors (every process takes part)
    and its first process writes them: the same files as a single-process run."""
    import os
    import shutil

    from safetensors.torch import save_file

    tensors = {"placeholder": placeholder.embedding.detach().cpu().clone(),  # layers: once they train
               **{f"layer.{k}": full(v.detach()).cpu().clone() for k, v in layer_params.items() if v.requires_grad}}
    optimizer_state = whole_optimizer_state(optimizer)
    if sharding is not None and not sharding.main:
        sharding.barrier()
        return
    final = out / "checkpoints" / f"step-{state.global_step}"
    tmp = out / "checkpoints" / f".step-{state.global_step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    atomic_write_json(tmp / "progress.json", asdict(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if sharding is not None:
        sharding.barrier()


def latest_checkpoint(out: Path) -> Path | None:
    folders = [p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "progress.json").exists()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(folder: Path, placeholder: Placeholder, layer_params: dict, generator, state: RunState) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        placeholder.embedding.copy_(tensors["placeholder"])
        for k, v in layer_params.items():
            if f"layer.{k}" in tensors:  # saved while training: fp32 masters, which stay fp32
                train_layers({k: v}, True)
                v.copy_(tensors[f"layer.{k}"])
    saved = torch.load(folder / "state.pt", weights_only=True)
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    progress = json.loads((folder / "progress.json").read_text())
    state.stage_index, state.step, state.global_step = progress["stage_index"], progress["step"], progress["global_step"]
    return saved


# --- outputs ----------------------------------------------------------------------------------------

def save_final_adapter(backbone, placeholder: Placeholder, layer_params: dict, lora_config, cfg: TrainConfig, out: Path,
                       write: bool = True):
    trained_layers = "layers" in STAGE_PLANS[cfg.stages] or cfg.stages == "joint"
    config = {
        "backbone": backbone.name, "base_fingerprint": adapter_files.base_fingerprint(backbone.folder),
        "placeholder": placeholder.text, "placeholder_token": placeholder.token,
        "placeholder_token_id": placeholder.token_ids[0], "placeholder_tokens": placeholder.tokens,
        "placeholder_token_ids": placeholder.token_ids, "class_name": cfg.class_name,
        **{k: v for k, v in asdict(cfg).items() if k not in ("class_name", "placeholder")},
        "sampling": sampling_config(backbone, cfg).distribution(),
    }
    dtype = backbone.input_embeddings().weight.dtype
    whole = {k: full(v.detach()) for k, v in layer_params.items()}  # gathered if sharded (every process)
    layer_tensors = {k: v.to(dtype) for k, v in whole.items()} if trained_layers and lora_config is None else None
    lora = (lora_config, whole) if trained_layers and lora_config is not None else None
    if write:
        adapter_files.save_adapter(out, config, placeholder.embedding, layer_tensors, lora)


@torch.no_grad()
def render_validation(backbone, placeholder: Placeholder, cfg: TrainConfig, path: Path, write: bool = True) -> list:
    """A small grid of the validation prompts with the current [V], drawn without touching training state
    (in a sharded run every process draws, in step, and the first writes)."""
    from ..images import make_grid
    from ..sampling import draw

    table = backbone.input_embeddings().weight
    original = table[placeholder.token_ids].clone()
    table[placeholder.token_ids] = placeholder.rows.to(table.dtype)
    training = [m for m in backbone.model.modules() if m.training]  # checkpointed layers would drop the KV cache
    backbone.model.eval()
    try:
        personalized = adapter_files.PersonalizedBackbone(backbone, placeholder.text, placeholder.token)
        with _autocast_for(backbone)():  # trained layers are fp32 copies inside a bf16 model
            images = draw(personalized, cfg.validation_prompts, sampling_config(backbone, cfg)).images
    finally:
        table[placeholder.token_ids] = original
        for module in training:
            module.train()
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(make_grid(images), path)
    return images


FIDELITY_LOG = "fidelity.jsonl"  # one record per validation grid: {"step", "stage", "fidelity", "encoder"}


def fidelity_scorer(backbone, references):
    """Fidelity along the run: the mean cosine similarity of validation pictures to the references, under the
    family's DINO-role encoder (backbones/families.py), as DreamBench's DINO score is computed. None, after one
    warning, where that encoder is not on this machine: the run goes on with its loss alone."""
    from ..assets import TOYDINO_DIR
    from ..backbones.families import family_defaults
    from ..eval.metrics import DinoEncoder, load_dino

    name = family_defaults(backbone.family).fidelity
    try:
        if name == "toydino":  # loaded directly: load_dino would warn that it is not the paper's DINO
            from transformers import ViTModel

            encoder = DinoEncoder(ViTModel.from_pretrained(TOYDINO_DIR, add_pooling_layer=False), "toyDINO")
        else:
            encoder = load_dino(None if name == "dino" else name)
    except (UserError, OSError) as e:
        warn(f"validation pictures are drawn but not scored for fidelity: {str(e).splitlines()[0]}")
        return None
    anchors = encoder.embed_images(references)

    def score(pictures) -> tuple[float, str]:
        return float((encoder.embed_images(pictures) @ anchors.T).mean()), encoder.source

    return score


def log_fidelity(out: Path, scorer, pictures: list, step: int, stage: str) -> None:
    """One fidelity.jsonl record; nothing where no scorer (no encoder, or not the writing process)."""
    if scorer is not None:
        value, encoder = scorer(pictures)
        _append_log(out / FIDELITY_LOG, {"step": step, "stage": stage, "fidelity": round(value, 4),
                                         "encoder": encoder})


def write_loss_plot(log_path: Path, png: Path) -> None:
    """The loss curve, and under it the fidelity of the validation pictures where they were scored."""
    from PIL import Image

    from ..images import line_plot

    records = read_jsonl(log_path)
    if not records:
        return
    plot = line_plot([r["loss"] for r in records], title="training loss (image tokens)")
    points = read_jsonl(log_path.parent / FIDELITY_LOG)
    if points:
        below = line_plot([r["fidelity"] for r in points], x_ends=(f"step {points[0]['step']}", points[-1]["step"]),
                          title=f"fidelity of the validation pictures: {points[0]['encoder']} cosine to the "
                                f"references, every validation step")
        both = Image.new("RGB", (plot.width, plot.height + below.height), "white")
        both.paste(plot, (0, 0))
        both.paste(below, (0, plot.height))
        plot = both
    atomic_save_image(plot, png)
