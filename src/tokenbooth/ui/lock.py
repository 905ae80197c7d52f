"""One server per workspace: `tokenbooth ui` holds WORKSPACE/.tokenbooth-ui.lock for as long as it runs.

Two servers on one workspace would each run their own queue over the same subjects (and the second, at start,
would mark the first one's running job "interrupted"), so the second refuses in one line naming the first's
pid. The file holds the pid for that message; what decides is an OS lock on the open file (flock), which the
kernel drops when the process dies however it dies, so a lock left by a dead server is simply taken over.
Where there is no flock (Windows), the pid decides: a lock whose process is gone is taken over.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

try:
    import fcntl  # POSIX only: Windows falls back to checking the recorded pid
except ImportError:
    fcntl = None

LOCK_FILE = ".tokenbooth-ui.lock"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def _recorded_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _refuse(root: Path, pid: int | None) -> UserError:
    who = f"another tokenbooth ui (pid {pid})" if pid else "another tokenbooth ui"
    return UserError(f"{who} is already serving the workspace {root}; open its page, stop it, "
                     "or start this one with another --workspace")


class WorkspaceLock:
    """Held from `acquire` until `release` or the process's end."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._file = None

    def acquire(self) -> "WorkspaceLock":
        if fcntl is None:
            return self._acquire_by_pid()
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise _refuse(self.root, _recorded_pid(self.path)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def _acquire_by_pid(self) -> "WorkspaceLock":
        pid = _recorded_pid(self.path)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            raise _refuse(self.root, pid)
        self.path.write_text(f"{os.getpid()}\n")  # absent, or left by a dead server: ours now
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (removing it would race a newcomer)
            self._file = None
