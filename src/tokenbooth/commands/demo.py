"""`tokenbooth demo`: personalize mini on the bundled toy robot and draw a comparison grid."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..personalize.demo import make_demo
from .common import add_sampler_flags, sampling_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="personalize mini on a bundled toy subject and draw a comparison grid",
                              description="Personalize mini on a bundled toy robot (about a minute on a CPU) and "
                                          "draw the references, the base model and the personalized model in "
                                          "new contexts, in one grid. Trains and samples with mini's defaults.")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="(default: out/demo)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a demo already in --out")
    add_sampler_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    make_demo(args.out, seed=args.seed, overwrite=args.overwrite, **sampling_overrides(args))
