"""What the user is told: mistakes they can fix (one line, non-zero exit, no traceback) and warnings."""

import sys


class UserError(Exception):
    """Something the user can fix: a wrong name, a missing file, a bad setting."""


def warn(message: str) -> None:
    """One line on stderr; the run goes on."""
    print(f"tokenbooth: warning: {message}", file=sys.stderr)
