"""`tokenbooth eval toybench`: the paper's experiment on mini, on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_sampler_flags, positive_int, sampling_overrides


def add_parser(subparsers) -> None:
    t = subparsers.add_parser("toybench", help="the paper's experiment on mini: ceiling, floor and ablations",
                              description="The paper's experiment on mini: reserved toyworld subjects, the "
                                          "two-stage recipe against its ablations, scored with toyCLIP and the "
                                          "toyworld checker. Trains and samples with mini's defaults.")
    t.add_argument("--output", type=Path, default=Path("runs/toybench"), help="(default: runs/toybench)")
    t.add_argument("--subjects", type=positive_int, default=10, help="reserved toyworld subjects to teach (default: 10)")
    t.add_argument("--clip", type=Path, help="CLIP for the metrics (default: the bundled toyCLIP)")
    t.add_argument("--seed", type=int, default=0, help="(default: 0)")
    add_sampler_flags(t)
    t.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..eval.toybench import run_toybench

    run_toybench(args.output, args.subjects, clip=args.clip, seed=args.seed, **sampling_overrides(args))
