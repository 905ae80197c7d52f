"""The two-stage personalization recipe of Sun et al. 2025, for any backbone.

  setup     reference images -> VQ tokens (once), placeholder [V] on a reserved vocabulary row
  stage 1   only [V]'s embedding learns: cross-entropy on the image tokens, Textual-Inversion prompts
  stage 2   [V] keeps learning and transformer layers join (Q/K/V of every layer, or LoRA on them)
  save      an adapter folder (adapter.py); checkpoints on the way make the run resumable

Training both at once from the start (`stages="joint"`) is the paper's failing variant, kept for the
ablation: the layers absorb the subject and [V] stays undertrained.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..io import atomic_path, atomic_save_image, atomic_write_json
from ..vq import pil_to_tensor
from . import adapter as adapter_files
from .templates import OBJECT_TEMPLATES, training_prompt

STAGE_PLANS = {
    "two-stage": ("embedding", "layers"),
    "embedding": ("embedding",),
    "joint": ("joint",),
}
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class TrainConfig:
    class_name: str | None
    placeholder: str = "[V]"
    init_token: str | None = None  # None: random init, as the paper
    stages: str = "two-stage"
    layers: str = "qkv"  # "qkv", "lora", or comma-separated regular expressions over parameter names
    lora_rank: int = 4
    lora_every: int = 1
    stage1_steps: int = 250
    stage1_lr: float = 3e-3
    stage2_steps: int = 60
    stage2_lr: float = 2e-4
    batch_size: int = 8
    flip: bool = False
    seed: int = 0
    checkpointing_steps: int = 50
    prior_preservation: bool = False
    num_class_images: int = 8
    prior_loss_weight: float = 1.0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 100
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~30% slower

    @classmethod
    def for_family(cls, family: str, **overrides) -> "TrainConfig":
        """The family's training defaults (backbones/families.py), with `overrides` on top."""
        from ..backbones.families import family_defaults

        return cls(**{"class_name": None, **family_defaults(family).train, **overrides})

    def validate(self) -> None:
        if self.stages not in STAGE_PLANS:
            raise UserError(f"--stages must be one of {', '.join(STAGE_PLANS)} (got {self.stages!r})")
        if not self.placeholder.strip() or any(c.isspace() for c in self.placeholder):
            raise UserError(f"placeholder {self.placeholder!r} must be a non-empty string without spaces")
        if any(self.placeholder in t.replace("{}", "") for t in OBJECT_TEMPLATES):
            raise UserError(f"placeholder {self.placeholder!r} also occurs in the training prompts; pick one like [V]")
        if self.class_name is not None and (not self.class_name.strip() or self.placeholder in self.class_name):
            raise UserError(f"class name {self.class_name!r} must be a word and must not contain the placeholder")
        for name in ("stage1_steps", "stage2_steps", "batch_size", "lora_rank", "lora_every", "checkpointing_steps",
                     "validation_steps", "num_class_images"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("stage1_lr", "stage2_lr"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")

    @property
    def plan(self) -> list[tuple[str, int]]:
        """(stage, steps) in order. Joint trains both for the two stages' steps together."""
        steps = {"embedding": self.stage1_steps, "layers": self.stage2_steps, "joint": self.stage1_steps + self.stage2_steps}
        return [(s, steps[s]) for s in STAGE_PLANS[self.stages]]


# --- setup ------------------------------------------------------------------------------------------

class Placeholder:
    """[V]: a reserved vocabulary row whose embedding is the one thing stage 1 learns."""

    def __init__(self, backbone, cfg: TrainConfig, generator: torch.Generator):
        candidates = backbone.placeholder_candidates()
        if not candidates:
            raise UserError(f"{backbone.name} has no free vocabulary row for the placeholder")
        self.text, self.token = cfg.placeholder, candidates[0]
        self.token_id = backbone.tokenizer.token_to_id(self.token)
        table = backbone.input_embeddings().weight.detach()
        if cfg.init_token:
            ids = backbone.tokenizer.encode(cfg.init_token, add_special_tokens=False).ids
            if not ids:
                raise UserError(f"--init-token {cfg.init_token!r} has no tokens")
            init = table[ids].float().mean(0)
        else:  # random, at the scale of the existing rows
            init = torch.randn(table.shape[1], generator=generator).to(table.device) * table.float().std()
        # fp32 master copy even when the model is bf16, on the table's device
        self.embedding = torch.nn.Parameter(init.float().clone())

    def embed(self, backbone, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with [V]'s row taken from the trainable copy."""
        embeds = backbone.embed(ids)
        ids = ids.to(embeds.device)
        return torch.where((ids == self.token_id)[..., None], self.embedding.to(embeds.dtype), embeds)

    def prompt_ids(self, backbone, prompt: str) -> list[int]:
        return backbone.prompt_ids(adapter_files.substitute_placeholder(prompt, self.text, self.token))


def reference_tokens(backbone, images, flip: bool) -> torch.Tensor:
    """VQ codes of every reference (and its mirror image when flipping): computed once, not every step."""
    pixels = pil_to_tensor(images)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return backbone.encode_images(pixels)


def class_tokens(backbone, cfg: TrainConfig, out: Path) -> torch.Tensor:
    """Prior preservation (DreamBooth): the base model's own images of the class, drawn once and cached."""
    from safetensors.torch import load_file, save_file

    from ..sampling import SamplingConfig, draw_codes

    path = out / "class_tokens.safetensors"
    if path.exists():
        codes = load_file(str(path))["codes"]
        if len(codes) >= cfg.num_class_images:
            return codes[: cfg.num_class_images]
    prompts = [training_prompt(i, cfg.class_name or "", None) for i in range(cfg.num_class_images)]
    codes = draw_codes(backbone, prompts, SamplingConfig(seed=cfg.seed))
    with atomic_path(path) as tmp:
        save_file({"codes": codes.contiguous()}, str(tmp))
    return codes


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


def batch_loss(backbone, placeholder: Placeholder, ids, labels, autocast) -> torch.Tensor:
    """Mean cross-entropy of the next image code, over the image codes only.

    The softmax runs over the K codes of `image_head`, not the whole vocabulary. That is Janus-Pro's own loss
    (its generation head has no text columns) and, for Lumina-mGPT, the log-likelihood of what its sampler
    actually draws (text tokens are masked at image positions); it differs from the full-vocabulary
    cross-entropy Lumina-mGPT trains with by the mass that softmax gives text tokens, which sampling never
    uses. It also skips 7/8 of Chameleon's output layer, and the head runs only where there is a label."""
    targets = labels[:, 1:]
    scored = targets >= 0
    with autocast():
        hidden, _ = backbone.hidden_states(inputs_embeds=placeholder.embed(backbone, ids))
        logits = backbone.image_head(hidden[:, :-1][scored.to(hidden.device)])
    return F.cross_entropy(logits.float(), targets[scored].to(logits.device))


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


def _autocast_for(backbone):
    dtype = next(backbone.model.parameters()).dtype
    device = next(backbone.model.parameters()).device.type
    if dtype == torch.float32:
        return lambda: torch.autocast(device, enabled=False)
    return lambda: torch.autocast(device, dtype=dtype)  # trainable fp32 copies, bf16 compute


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
          stop_after: int | None = None) -> Path:
    """Personalizes `backbone` on `images`; writes the adapter to `out` and returns it.

    stop_after: end the run (checkpoint written) after this many steps in all, as an interruption would."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(cfg.seed)
    placeholder = Placeholder(backbone, cfg, generator)
    codes = reference_tokens(backbone, images, cfg.flip)
    prior = class_tokens(backbone, cfg, out) if cfg.prior_preservation else None

    for p in backbone.model.parameters():
        p.requires_grad_(False)
    lora_config = add_lora(backbone, cfg) if cfg.layers == "lora" else None
    layer_params = lora_params(backbone) if lora_config else select_layer_params(backbone, cfg)
    for p in layer_params.values():
        if p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights; autocast computes in the model's dtype

    state = RunState()
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        raise UserError(f"nothing to resume in {out} (no checkpoints/step-N)")
    saved = load_checkpoint(checkpoint, placeholder, layer_params, generator, state) if checkpoint else None

    autocast = _autocast_for(backbone)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    log_path = out / "log.jsonl"
    _truncate_log(log_path, state.global_step)  # an interrupted run may have logged past its last checkpoint
    for stage_index, (stage, steps) in enumerate(cfg.plan):
        if stage_index < state.stage_index:
            continue
        trainable = [placeholder.embedding] + (list(layer_params.values()) if stage != "embedding" else [])
        for p in layer_params.values():
            p.requires_grad_(stage != "embedding")
        optimizer = torch.optim.AdamW(stage_params(stage, placeholder, layer_params, cfg), weight_decay=0.0)
        if saved is not None and stage_index == state.stage_index and saved.get("optimizer"):
            optimizer.load_state_dict(saved["optimizer"])
        saved = None
        if stage_index > state.stage_index:
            state.stage_index, state.step = stage_index, 0
        bar = _bar(steps, state.step, f"stage {stage_index + 1}/{len(cfg.plan)} ({stage})", progress)
        t0 = time.time()
        while state.step < steps:
            ids, labels = make_batch(backbone, placeholder, cfg, codes, generator, subject=True)
            loss = batch_loss(backbone, placeholder, ids, labels, autocast)
            if prior is not None:
                ids, labels = make_batch(backbone, placeholder, cfg, prior, generator, subject=False)
                loss = loss + cfg.prior_loss_weight * batch_loss(backbone, placeholder, ids, labels, autocast)
            if not math.isfinite(loss.item()):
                last = latest_checkpoint(out)
                raise UserError(f"loss became {loss.item()} at step {state.global_step + 1}; stopped"
                                + (f" (last good checkpoint: {last})" if last else "") + "; try a lower learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            state.step += 1
            state.global_step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            _append_log(log_path, {"step": state.global_step, "stage": stage, "loss": round(loss.item(), 5),
                                   "seconds": round(time.time() - t0, 3)})
            t0 = time.time()
            finished = state.step == steps and stage_index == len(cfg.plan) - 1
            if state.global_step % cfg.checkpointing_steps == 0 or state.global_step == stop_after:
                save_checkpoint(out, state, placeholder, layer_params, optimizer, generator)
            if cfg.validation_prompts and state.global_step % cfg.validation_steps == 0 and not finished:
                render_validation(backbone, placeholder, cfg, out / "validation" / f"step-{state.global_step}.png")
            if state.global_step == stop_after and not finished:
                bar.close()
                backbone.model.eval()
                return out
        bar.close()

    backbone.model.eval()  # checkpointing put layers in training mode; sampling wants them as they were
    write_loss_plot(log_path, out / "loss.png")
    save_final_adapter(backbone, placeholder, layer_params, lora_config, cfg, out)
    if cfg.validation_prompts:
        render_validation(backbone, placeholder, cfg, out / "validation" / "final.png")
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

def save_checkpoint(out: Path, state: RunState, placeholder: Placeholder, layer_params: dict, optimizer, generator):
    """checkpoints/step-N/: trainable tensors, optimizer and RNG state. The folder appears complete or not
    at all (written beside, then renamed)."""
    import os
    import shutil

    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{state.global_step}"
    tmp = out / "checkpoints" / f".step-{state.global_step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {"placeholder": placeholder.embedding.detach().cpu().clone(),
               **{f"layer.{k}": v.detach().cpu().clone() for k, v in layer_params.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    atomic_write_json(tmp / "progress.json", asdict(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def latest_checkpoint(out: Path) -> Path | None:
    folders = [p for p in (Path(out) / "checkpoints").glob("step-*") if (p / "progress.json").exists()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def load_checkpoint(folder: Path, placeholder: Placeholder, layer_params: dict, generator, state: RunState) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        placeholder.embedding.copy_(tensors["placeholder"])
        for k, v in layer_params.items():
            v.copy_(tensors[f"layer.{k}"])
    saved = torch.load(folder / "state.pt", weights_only=True)
    generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    progress = json.loads((folder / "progress.json").read_text())
    state.stage_index, state.step, state.global_step = progress["stage_index"], progress["step"], progress["global_step"]
    return saved


# --- outputs ----------------------------------------------------------------------------------------

def save_final_adapter(backbone, placeholder: Placeholder, layer_params: dict, lora_config, cfg: TrainConfig, out: Path):
    trained_layers = "layers" in STAGE_PLANS[cfg.stages] or cfg.stages == "joint"
    config = {
        "backbone": backbone.name, "base_fingerprint": adapter_files.base_fingerprint(backbone.folder),
        "placeholder": placeholder.text, "placeholder_token": placeholder.token,
        "placeholder_token_id": placeholder.token_id, "class_name": cfg.class_name,
        **{k: v for k, v in asdict(cfg).items() if k not in ("class_name", "placeholder")},
    }
    layer_tensors = {k: v.to(next(backbone.model.parameters()).dtype) for k, v in layer_params.items()} \
        if trained_layers and lora_config is None else None
    lora = (lora_config, dict(layer_params)) if trained_layers and lora_config is not None else None
    adapter_files.save_adapter(out, config, placeholder.embedding, layer_tensors, lora)


@torch.no_grad()
def render_validation(backbone, placeholder: Placeholder, cfg: TrainConfig, path: Path) -> None:
    """A small grid of the validation prompts with the current [V], drawn without touching training state."""
    from ..images import make_grid
    from ..sampling import SamplingConfig, generate_images

    table = backbone.input_embeddings().weight
    original = table[placeholder.token_id].clone()
    table[placeholder.token_id] = placeholder.embedding.to(table.dtype)
    training = [m for m in backbone.model.modules() if m.training]  # checkpointed layers would drop the KV cache
    backbone.model.eval()
    try:
        personalized = adapter_files.PersonalizedBackbone(backbone, placeholder.text, placeholder.token)
        with _autocast_for(backbone)():  # trained layers are fp32 copies inside a bf16 model
            images = generate_images(personalized, cfg.validation_prompts, SamplingConfig(seed=cfg.seed))
    finally:
        table[placeholder.token_id] = original
        for module in training:
            module.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(make_grid(images), path)


def write_loss_plot(log_path: Path, png: Path) -> None:
    from ..images import line_plot

    if not log_path.exists():
        return
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if records:
        atomic_save_image(line_plot([r["loss"] for r in records], title="training loss (image tokens)"), png)
