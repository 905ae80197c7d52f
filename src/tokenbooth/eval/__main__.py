"""`python -m tokenbooth.eval ARGS` is `tokenbooth eval ARGS`; under `accelerate launch -m tokenbooth.eval
dreambench ...` the subjects are shared between the processes."""

import sys

from ..cli import main

sys.exit(main(["eval", *sys.argv[1:]]))
