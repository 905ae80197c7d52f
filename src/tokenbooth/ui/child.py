"""`python -m tokenbooth.ui.child train ...`: the `tokenbooth` command, run as the web app's child.

The only difference from `tokenbooth ...`: on Linux the child asks the kernel for SIGTERM when the server
dies (prctl PR_SET_PDEATHSIG), so a server killed outright never leaves a training writing into the
workspace behind its back. Training writes checkpoints atomically, so that SIGTERM costs at most the steps
since the last checkpoint, and the restarted server offers to resume.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.environ.get("TOKENBOOTH_UI_PARENT")
    if parent and os.getppid() != int(parent):  # the server died before the request took effect
        sys.exit(143)


if __name__ == "__main__":
    die_with_parent()
    # imported only now: the cli pulls in torch (seconds), and the death signal must be asked for before that
    from ..cli import main

    sys.exit(main(sys.argv[1:]))
