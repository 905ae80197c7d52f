"""`python -m tokenbooth.eval.mini_quality ARGS` is `tokenbooth eval mini-quality ARGS`: the old way in, kept for
the command lines already written down."""

import sys

from ...cli import main

sys.exit(main(["eval", "mini-quality", *sys.argv[1:]]))
