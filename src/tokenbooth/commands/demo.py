"""`tokenbooth demo`: personalize mini on the bundled toy robot, draw a comparison grid, and print the attribute
reader's verdict on each row (eval/demo_figures.py; also in demo.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backbones.quantize import QUANTIZE
from ..eval.demo_figures import judge_rows, verdict_lines
from ..eval.reader import load_reader
from ..personalize.demo import make_demo
from ..quiet import require_optional
from ..toyworld import demo_subject
from .common import add_sampler_flags, sampling_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="personalize mini on a bundled toy subject and draw a comparison grid",
                              description="Personalize mini on a bundled toy robot (about a minute on a CPU) and "
                                          "draw the references, the base model and the personalized model in "
                                          "new contexts, in one grid. Trains and samples with mini's defaults.")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="(default: out/demo)")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a demo already in --out")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="the whole demo on a base in 8 (int8) or 4 (nf4) bits: stage 2 trains LoRA over it (QLoRA) "
                        "and every row is drawn on it (needs torchao; default: none)")
    add_sampler_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    reader = load_reader()  # before the minute of training: a missing or stale reader stops the demo at once
    if args.quantize != "none":
        require_optional("torchao", f"--quantize {args.quantize}")  # before training, not after

    def judge(rows: list[dict]) -> dict:
        figures = judge_rows(reader, demo_subject.SUBJECT, rows)
        print("\n".join(verdict_lines(figures)))
        return figures

    make_demo(args.out, seed=args.seed, overwrite=args.overwrite, judge=judge, quantize=args.quantize,
              **sampling_overrides(args))
