"""Everything that would stop a run, checked before it writes anything: a run that fails should fail in its
first second, with one line that says why, and leave no folder behind."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from ..io import check_can_create
from ..sampling.sampler import check_prompt_fits
from . import adapter as adapter_files
from . import run_folder
from .config import TrainConfig
from .placeholder import placeholder_tokens
from .targets import select_layer_params
from .templates import OBJECT_TEMPLATES, training_prompt


def check_run(backbone, cfg: TrainConfig, out: Path, resume: bool, sharding=None, stage1_from: Path | None = None
              ) -> None:
    """The settings, the class word, the --layers targets, the sequence length, what `out` already holds, and
    the stage 1 it starts from."""
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
        saved, _ = run_folder.read_run(out)
        if run_folder.latest_checkpoint(out) is None:
            raise UserError(f"nothing to resume in {out} (no {run_folder.CHECKPOINTS}/step-N)")
        changed = [k for k, v in asdict(cfg).items() if getattr(saved, k) != v]
        if changed:
            raise UserError(f"{out} holds a run with {changed[0]} {getattr(saved, changed[0])!r}, not "
                            f"{getattr(cfg, changed[0])!r}; resume with the run's own settings")
    elif (out / adapter_files.CONFIG).exists():
        raise UserError(f"{out} already holds an adapter; choose another output folder")
    elif run_folder.latest_checkpoint(out) is not None:
        raise UserError(f"{out} holds an unfinished run; resume it (train --resume) or choose another output folder")
    if stage1_from is not None and not resume:
        run_folder.stage1_checkpoint(backbone, cfg, Path(stage1_from))
    if sharding is not None:
        sharding.barrier()  # every process has looked at `out` before the first one writes there


def check_class_name(backbone, class_name: str | None) -> None:
    """The class word must tokenize without unknown pieces: a prompt the model cannot read teaches nothing."""
    if class_name:
        ids = backbone.tokenizer.encode(class_name, add_special_tokens=False).ids
        unk = backbone.tokenizer.token_to_id("<unk>")
        if not ids or (unk is not None and unk in ids):
            raise UserError(f"the tokenizer of {backbone.name} cannot encode the class name {class_name!r}")


def check_training_fits(backbone, cfg: TrainConfig) -> None:
    """The longest training sequence (prompt, then the image) must fit the model's context, as `generate`
    checks for its prompt: past it a large model runs out of memory instead of saying why. So must the
    validation prompts."""
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
