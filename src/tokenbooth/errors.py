"""User mistakes: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Something the user can fix: a wrong name, a missing file, a bad setting."""
