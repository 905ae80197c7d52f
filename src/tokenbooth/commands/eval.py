"""`tokenbooth eval`: the benchmarks, one module each (dreambench.py, toybench.py)."""

from __future__ import annotations

from . import dreambench, toybench


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="benchmarks: dreambench, toybench",
                              description="Benchmarks: DreamBench (real backbones) and toy-bench (mini, on a CPU).")
    benchmarks = e.add_subparsers(dest="benchmark", required=True, metavar="{dreambench,toybench}")
    dreambench.add_parser(benchmarks)
    toybench.add_parser(benchmarks)
