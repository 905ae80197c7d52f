"""`tokenbooth train`: flags -> TrainConfig (the family's defaults under the flags given) -> the recipe.

`--resume` continues the run saved in the output folder with its own settings; a flag that would change
them is refused, not ignored.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..backbones.families import FAMILIES
from ..backbones.quantize import QUANTIZE
from ..errors import UserError
from ..eval.fidelity import fidelity_scorer
from ..personalize import TrainConfig, load_reference_images, read_run, train
from ..personalize.config import COMPUTE_DTYPES, STAGE_PLANS, check_train_values
from ..personalize.lean import OPTIMIZERS
from ..personalize.sharded import Sharding
from .common import DEFAULT_MODEL, add_model_flags, family_default, finite_float, load_model

# TrainConfig fields set by a flag of the same name (--stage1-steps -> stage1_steps), and the flag's type
TRAIN_FLAGS = {
    "placeholder": str, "num_vectors": int, "init_token": str, "stages": str, "layers": str, "lora_rank": int,
    "lora_every": int,
    "stage1_steps": int, "stage1_lr": finite_float, "stage2_steps": int, "stage2_lr": finite_float,
    "batch_size": int, "flip": bool, "seed": int, "checkpointing_steps": int, "prior_preservation": bool,
    "num_class_images": int, "prior_loss_weight": finite_float, "validation_prompts": list,
    "validation_steps": int, "gradient_checkpointing": bool, "gradient_accumulation_steps": int, "quantize": str,
    "optimizer": str, "compute_dtype": str, "max_grad_norm": finite_float, "weight_decay": finite_float,
}
HELP = {
    "placeholder": "the string prompts use for the subject",
    "num_vectors": "[V] as this many tokens, each with its own learned embedding (multi-vector Textual Inversion; "
                   "the paper: 1)",
    "init_token": "start [V] from this word's embedding (default: random, as the paper)",
    "stages": "two-stage (the paper's), embedding (stage 1 only) or joint (both from step 0: the paper's "
              "failing variant)",
    "layers": "stage-2 targets: qkv (paper), lora, or comma-separated regexes over parameter names",
    "lora_every": "LoRA on every N-th layer",
    "flip": "add mirrored copies of the images",
    "prior_preservation": "DreamBooth's class-prior loss",
    "validation_prompts": "draw this prompt every --validation-steps (repeatable)",
    "gradient_checkpointing": "recompute activations in the backward pass: less GPU memory, slower steps",
    "gradient_accumulation_steps": "split each step's --batch-size pairs into this many micro-batches (same "
                                   "gradient, less memory)",
    "quantize": "frozen base in int8 or nf4 (4-bit; with --layers lora: QLoRA); `tokenbooth plan` tells what fits",
    "optimizer": "adamw, or adamw8bit (both moments in 8 bits)",
    "compute_dtype": "model (the weights' dtype) or bfloat16 (bf16 matrix products over fp32 weights: mini's, "
                     "faster on a CPU with AVX512-BF16)",
    "max_grad_norm": "clip each step's gradients to this total norm",
    "weight_decay": "AdamW's weight decay",
}


def default_help(name: str, default) -> str:
    """What --help says a flag defaults to: the family table's values where it sets this field
    (backbones/families.py), else TrainConfig's own default."""
    families = {family: d.train[name] for family, d in FAMILIES.items() if name in d.train}
    if len(families) == len(FAMILIES):
        return family_default("train", name)
    shown = f"default: {default}" if default is not None else ""
    if families:
        shown += f" ({', '.join(f'{family}: {value}' for family, value in families.items())})"
    return shown


def add_parser(subparsers) -> None:
    choices = {"stages": list(STAGE_PLANS), "quantize": list(QUANTIZE), "optimizer": list(OPTIMIZERS),
               "compute_dtype": list(COMPUTE_DTYPES)}

    t = subparsers.add_parser("train", help="personalize a model on 3-5 images of a subject (two-stage recipe)",
                              description="Personalize a model on 3-5 images of a subject (two-stage recipe).")
    add_model_flags(t)
    t.add_argument("--images", type=Path, metavar="FOLDER", help="folder with the subject's images (a resumed run: its own)")
    t.add_argument("--class-name", help="the subject's class word, e.g. dog")
    t.add_argument("--no-class-name", action="store_true", default=None,
                   help="prompts with [V] alone (the paper's ablation)")
    t.add_argument("--output", type=Path, required=True, help="adapter folder to write")
    t.add_argument("--resume", nargs="?", const="latest",
                   help="continue the run in --output ('latest') or in the folder given, with its saved settings")
    defaults = {f.name: f.default for f in TrainConfig.__dataclass_fields__.values()}
    for name, kind in TRAIN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        shown = "" if kind in (bool, list) else default_help(name, defaults[name])
        text = "; ".join(s for s in (HELP.get(name, ""), shown) if s)
        if kind is bool:
            t.add_argument(flag, action="store_true", default=None, help=text)
        elif kind is list:
            t.add_argument("--validation-prompt", action="append", dest=name, metavar="PROMPT", help=text)
        else:
            t.add_argument(flag, type=kind, help=text, **({"choices": choices[name]} if name in choices else {}))
    t.set_defaults(run=run)


def given_settings(args) -> dict:
    """The TrainConfig fields the flags set, class_name included when --class-name or --no-class-name is given."""
    if args.no_class_name and args.class_name:
        raise UserError("--class-name and --no-class-name contradict each other")
    given = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    if args.no_class_name:
        given["class_name"] = None
    elif args.class_name is not None:
        given["class_name"] = args.class_name.strip()
    check_train_values(given)
    return given


def resumed_run(out: Path, args, given: dict):
    """(config, source) of the run in `out`; a flag that disagrees with it is refused."""
    cfg, source = read_run(out)
    for name, value in given.items():
        if getattr(cfg, name) != value:
            flag = "--no-class-name" if name == "class_name" and value is None else "--" + name.replace("_", "-")
            raise UserError(f"{flag} {'' if value is None else value!r} conflicts with the run in {out} "
                            f"({getattr(cfg, name)!r}); --resume continues a run with its own settings")
    for flag, value in (("model", args.model), ("resolution", args.resolution),
                        ("images", args.images and str(args.images.resolve()))):
        if value is not None and source.get(flag) is not None and value != source[flag]:
            raise UserError(f"--{flag} {value} conflicts with the run in {out} ({source[flag]}); --resume continues "
                            f"a run with its own settings")
    return cfg, source


def run(args: argparse.Namespace) -> None:
    given = given_settings(args)
    out = args.output if args.resume in (None, "latest") else Path(args.resume)
    resuming = args.resume is not None
    if resuming:
        cfg, source = resumed_run(out, args, given)
        args.model, args.resolution = args.model or source.get("model"), args.resolution or source.get("resolution")
        images_folder = args.images or (Path(source["images"]) if source.get("images") else None)
    else:
        if "class_name" not in given:
            raise UserError("--class-name is required (the subject's class word, e.g. dog), or pass --no-class-name")
        images_folder = args.images
    if images_folder is None:
        raise UserError("--images is required (the folder with the subject's images)")
    backbone = load_model(args, quantize=cfg.quantize if resuming else given.get("quantize", "none"))
    if not resuming:
        cfg = TrainConfig.for_family(backbone.family, **given)
    images = load_reference_images(images_folder, backbone.resolution)
    print(f"personalizing {backbone.name} on {len(images)} image(s): "
          + ", ".join(f"{stage} x{steps}" for stage, steps in cfg.plan))
    t0 = time.time()
    source = {"model": args.model or DEFAULT_MODEL, "resolution": args.resolution,
              "images": str(Path(images_folder).resolve())}
    try:
        train(backbone, images, cfg, out, resume=resuming, source=source,
              sharding=Sharding.from_environment(),  # under `accelerate launch`: one run over the processes
              fidelity_scorer=fidelity_scorer)  # the validation pictures' fidelity, by the family's DINO-role encoder
    except OSError as e:
        raise UserError(f"could not write to {out}: {e.strerror or e}; the last complete checkpoint is kept") from None
    print(f"adapter written to {out} ({time.time() - t0:.0f}s); try: tokenbooth generate --adapter {out} "
          f"\"a {cfg.placeholder}{' ' + cfg.class_name if cfg.class_name else ''} on the beach\"")
