"""`tokenbooth eval toybench`: the paper's Table 1 and its ablations on mini, on a CPU (eval/toybench/; what
it asks and how it scores: docs/toybench/README.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.toybench import ROWS, SPLITS, ToyBenchConfig, run_toybench
from .common import add_sampling_flags, finite_float, positive_int, sampling_overrides

# the training settings a tuning run may change (TrainConfig fields; validated with the rest of the config)
TRAIN_FLAGS = {"stage1_steps": positive_int, "stage1_lr": finite_float, "stage2_steps": positive_int,
               "stage2_lr": finite_float, "batch_size": positive_int, "num_vectors": positive_int}


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("toybench", help="the paper's Table 1 on mini: ceiling, floor and ablations",
                              description="The paper's Table 1 and its ablations on mini: reserved toyworld "
                                          "subjects, the two-stage recipe against its ablations, scored with "
                                          "toyDINO, toyCLIP and the attribute reader, with 95% bootstrap "
                                          "intervals. Trains and samples with the model family's defaults; an "
                                          "interrupted run continues where it stopped.")
    t.add_argument("--output", type=Path, default=Path("runs/toybench"),
                   help="(default: runs/toybench; the report's figures live in docs/toybench)")
    t.add_argument("--split", choices=tuple(SPLITS), default="test",
                   help="test: 12 subjects, one per class, never tuned on; dev: the 24 others (default: test)")
    t.add_argument("--subjects", type=positive_int, help="only the first N subjects of the split (default: all)")
    t.add_argument("--rows", default=",".join(ROWS),
                   help="comma-separated rows to run, for tuning (default: all; the references always come)")
    t.add_argument("--model", default="mini", help="the model to personalize (default: mini)")
    t.add_argument("--seed", type=int, default=0, help="of training and sampling (default: 0)")
    for name, kind in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), type=kind, help="(default: the model family's)")
    t.add_argument("--validation-steps", type=positive_int,
                   help="draw 4 validation pictures every N training steps and log their fidelity (toyDINO); the "
                        "report tabulates it along the run (default: none)")
    t.add_argument("--dino", help="DINO-style encoder for the dino metric, a ViT folder (default: the bundled toyDINO)")
    t.add_argument("--clip", help="CLIP for clip_i and clip_t (default: the bundled toyCLIP)")
    t.add_argument("--reader", help="attribute reader folder for identity and prompt (default: the bundled one)")
    add_sampling_flags(t)
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    train = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    cfg = ToyBenchConfig(model=args.model, split=args.split, subjects=args.subjects, seed=args.seed, train=train,
                         sampling=sampling_overrides(args), dino=args.dino, clip=args.clip, reader=args.reader,
                         rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()),
                         validation_steps=args.validation_steps)
    run_toybench(cfg, args.output)
