"""`tokenbooth eval`: the benchmarks, one module each (dreambench.py, toybench.py), and mini's own quality
figures (`eval mini-quality`, eval/mini_quality.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.mini_quality import MiniQualityConfig, measure
from . import dreambench, toybench
from .common import DEFAULT_MODEL, MODEL_HELP, add_sampling_flags, sampling_overrides


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="benchmarks: dreambench, toybench; mini's quality: mini-quality",
                              description="Benchmarks: DreamBench (real backbones) and toy-bench (mini, on a CPU); "
                                          "mini-quality: mini's own figures (VQGAN, prompt adherence, diversity).")
    benchmarks = e.add_subparsers(dest="benchmark", required=True, metavar="{dreambench,toybench,mini-quality}")
    dreambench.add_parser(benchmarks)
    toybench.add_parser(benchmarks)
    add_mini_quality_parser(benchmarks)


def add_mini_quality_parser(subparsers) -> None:
    m = subparsers.add_parser("mini-quality", help="mini's quality: VQGAN PSNR, prompt adherence, diversity",
                              description="How good is mini: the VQGAN's reconstruction PSNR, prompt adherence on "
                                          "held-out and seen (class, color, background) combinations read back by "
                                          "the attribute reader (with its own ceilings), and diversity over seeds. "
                                          "Writes OUT/mini-quality.json and OUT/mini-samples.png. Long on a CPU.")
    m.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    m.add_argument("--out", type=Path, default=Path("docs"), help="folder for the two files (default: docs)")
    m.add_argument("--seed", type=int, default=0, help="of the prompts' draw and of sampling (default: 0)")
    add_sampling_flags(m)
    m.set_defaults(run=run_mini_quality)


def run_mini_quality(args: argparse.Namespace) -> None:
    sampling = sampling_overrides(args)  # checked before the model loads
    measure(MiniQualityConfig(model=args.model, out=args.out, seed=args.seed, sampling=sampling))
