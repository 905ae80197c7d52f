"""The `tokenbooth` command: parses the command line and hands it to the subcommand (commands/); a user
mistake becomes one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys

import torch

from . import __version__
from .commands import MODULES
from .commands.common import Parser, UsageError
from .errors import UserError


def build_parser():
    ap = Parser(prog="tokenbooth", description="Personalize auto-regressive text-to-image models.")
    ap.add_argument("--version", action="version", version=f"tokenbooth {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{generate,train,demo,score,eval,convert,ui,plan}")
    for module in MODULES:
        module.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        torch.set_flush_denormal(True)  # denormals slow CPU kernels down many times over
        args.run(args)
    except UserError as e:
        print(f"tokenbooth: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("tokenbooth: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
