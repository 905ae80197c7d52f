"""`tokenbooth demo`: personalize mini on the bundled toy robot, draw a comparison grid, and print the attribute
reader's verdict on each row (eval/demo_figures.py; also in demo.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.demo_figures import judge_rows, verdict_lines
from ..eval.reader import load_reader
from ..personalize.demo import make_demo
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
    add_sampler_flags(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    reader = load_reader()  # before the minute of training: a missing or stale reader stops the demo at once

    def judge(rows: list[dict]) -> dict:
        figures = judge_rows(reader, demo_subject.SUBJECT, rows)
        print("\n".join(verdict_lines(figures)))
        return figures

    make_demo(args.out, seed=args.seed, overwrite=args.overwrite, judge=judge, **sampling_overrides(args))
