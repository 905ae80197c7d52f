"""`tokenbooth eval dreambench`: personalize, draw and score every DreamBench subject; --list shows what a
run would do without loading any model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backbones.quantize import QUANTIZE
from ..errors import UserError
from ..eval.dreambench import RunSettings, run_dreambench
from ..eval.dreambench_data import describe, read_dreambench
from .common import (DEFAULT_MODEL, MODEL_HELP, add_sampler_flags, family_default, finite_float, positive_int,
                     sampling_overrides)
from ..quiet import require_optional
from .score import add_metric_flags


def add_parser(subparsers) -> None:
    b = subparsers.add_parser("dreambench", help="personalize, draw and score every DreamBench subject",
                              description="Personalize, draw and score every DreamBench subject; tables per "
                                          "subject and overall. A finished subject is skipped on restart.")
    b.add_argument("--data", type=Path, required=True,
                   help="DreamBench's dataset/ folder (github.com/google/dreambooth)")
    b.add_argument("--list", "--dry-run", action="store_true", dest="list",
                   help="print the subjects, classes, image counts and prompts found, then stop (loads no model)")
    b.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    b.add_argument("--resolution", type=int, help="image size of a Lumina-mGPT folder whose name does not say it; "
                                                  "Emu3's side in pixels, a multiple of 8 (default: 720)")
    b.add_argument("--output", type=Path, help="run folder (required unless --list); a finished subject is skipped")
    b.add_argument("--subjects", help="comma-separated subset, e.g. dog,cat,backpack (default: all)")
    b.add_argument("--images-per-prompt", type=positive_int, default=1, help="the paper: 1 (default); DreamBooth: 4")
    b.add_argument("--protocol", choices=("paper", "all-pairs"), default="paper",
                   help="paper: mean per image, per subject, then over subjects (default); all-pairs: DreamBooth's "
                        "pooled mean")
    b.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed + i; training uses seed "
                                                       "(default: 0)")
    b.add_argument("--cfg", type=finite_float, help="classifier-free guidance scale; "
                   + family_default("sample", "cfg_scale"))
    b.add_argument("--top-k", type=int, help="image top-k; " + family_default("sample", "image_top_k"))
    add_sampler_flags(b)
    b.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="every subject on a base in 8 (int8) or 4 (nf4) bits: stage 2 trains LoRA over it (QLoRA) and "
                        "its prompts are drawn on it (needs torchao; default: none)")
    for name in ("stage1_steps", "stage2_steps", "batch_size"):
        b.add_argument("--" + name.replace("_", "-"), type=int, help=family_default("train", name))
    add_metric_flags(b)
    b.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    sampling = sampling_overrides(args)
    settings = RunSettings(model=args.model, images_per_prompt=args.images_per_prompt, seed=args.seed,
                           cfg=args.cfg, top_k=args.top_k, placeholder=args.placeholder,
                           stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps, batch_size=args.batch_size,
                           sampler=sampling["sampler"], sjd_window=args.sjd_window, sjd_init=args.sjd_init,
                           sjd_coupling=args.sjd_coupling, sjd_proactive=args.sjd_proactive,
                           quantize=args.quantize, resolution=args.resolution)
    settings.validate()
    if args.quantize != "none" and not args.list:
        require_optional("torchao", f"--quantize {args.quantize}")  # before the first subject trains
    if args.list:
        print(describe(read_dreambench(args.data, subjects), settings.placeholder), end="")
        return
    if args.output is None:
        raise UserError("--output is required (the run folder), unless --list")
    run_dreambench(settings, args.data, args.output, subjects, protocol=args.protocol, dino=args.dino, clip=args.clip)
