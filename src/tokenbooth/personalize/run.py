"""`tokenbooth train`: flags -> TrainConfig (backbone defaults filled in) -> the recipe."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json
from .defaults import defaults_for
from .recipe import TrainConfig, latest_checkpoint, train

RUN_CONFIG = "train_config.json"  # the settings of a run, so --resume continues exactly that run


def config_from_args(args, family: str) -> TrainConfig:
    if args.no_class_name and args.class_name:
        raise UserError("--class-name and --no-class-name contradict each other")
    if not args.no_class_name and not args.class_name:
        raise UserError("--class-name is required (the subject's class word, e.g. dog), or pass --no-class-name")
    values = defaults_for(family)
    for f in fields(TrainConfig):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "class_name":
            values[f.name] = given
    return TrainConfig(class_name=None if args.no_class_name else args.class_name.strip(), **values)


def output_folder(args) -> tuple[Path, bool]:
    """(folder, resuming)."""
    if args.resume is None:
        out = args.output
        if (out / "adapter_config.json").exists():
            raise UserError(f"{out} already holds an adapter; choose another --output")
        if latest_checkpoint(out) is not None:
            raise UserError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --output")
        return out, False
    out = args.output if args.resume == "latest" else Path(args.resume)
    if not (out / RUN_CONFIG).exists() or latest_checkpoint(out) is None:
        raise UserError(f"nothing to resume in {out} (no checkpoints/step-N)")
    return out, True


def run_train(args) -> None:
    from ..backbones import load_backbone_from_args
    from .data import load_reference_images

    out, resuming = output_folder(args)
    backbone = load_backbone_from_args(args)
    if resuming:
        cfg = TrainConfig(**json.loads((out / RUN_CONFIG).read_text()))
    else:
        cfg = config_from_args(args, backbone.family)
    cfg.validate()
    _check_tokenizable(backbone, cfg)
    images = load_reference_images(args.images, backbone.resolution)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror}") from None
    atomic_write_json(out / RUN_CONFIG, asdict(cfg))
    print(f"personalizing {backbone.name} on {len(images)} image(s): "
          + ", ".join(f"{stage} x{steps}" for stage, steps in cfg.plan))
    t0 = time.time()
    try:
        train(backbone, images, cfg, out, resume=resuming)
    except OSError as e:
        raise UserError(f"could not write to {out}: {e.strerror or e}; the last complete checkpoint is kept") from None
    print(f"adapter written to {out} ({time.time() - t0:.0f}s); try: tokenbooth generate --adapter {out} "
          f"\"a {cfg.placeholder}{' ' + cfg.class_name if cfg.class_name else ''} on the beach\"")


def _check_tokenizable(backbone, cfg: TrainConfig) -> None:
    if cfg.class_name:
        ids = backbone.tokenizer.encode(cfg.class_name, add_special_tokens=False).ids
        unk = backbone.tokenizer.token_to_id("<unk>")
        if not ids or (unk is not None and unk in ids):
            raise UserError(f"the tokenizer of {backbone.name} cannot encode the class name {cfg.class_name!r}")
