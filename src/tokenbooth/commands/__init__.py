"""The `tokenbooth` subcommands, one module each: `add_parser(subparsers)` declares the flags and
`run(args)` turns them into typed settings and calls the library. Nothing outside this package sees
argparse."""

from . import convert, demo, eval, generate, plan, score, train, ui

MODULES = (generate, train, demo, score, eval, convert, ui, plan)
