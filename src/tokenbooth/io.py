"""Writing files so that an interruption never leaves a half-written one behind, and finding out before a
long run whether its outputs can be written at all."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class DiskFull(UserError):
    """The disk filled up while `path` was being written (nothing half-written is left of it)."""

    def __init__(self, path: Path):
        super().__init__(f"no space left on the device to write {path}")
        self.path = Path(path)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, however the writer reports it: an OSError, or a library's own error that only says it in words
    (safetensors: "I/O error: No space left on device (os error 28)")."""
    if isinstance(error, DiskFull) or (isinstance(error, OSError) and error.errno == errno.ENOSPC):
        return True
    return "No space left on device" in str(error) or "os error 28" in str(error)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename. The file gets the
    mode a plain open() would give it (0666 less the umask), not mkstemp's (or safetensors') private 0600. A
    full disk is raised as DiskFull, naming `path`, the temporary file removed."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(path) from None
        raise
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(e) and not isinstance(e, DiskFull):
            raise DiskFull(path) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_image(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def check_can_create(path: Path, what: str, folder: bool) -> None:
    """Refuses, before any work, an output that could not be written: an existing path of the wrong kind, or
    a nearest existing parent that is not a writable folder. Creates nothing."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{what} {path} is {'not ' if folder else ''}a folder")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create {what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: {parent} is not writable")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a file, or one line saying why not (missing, unreadable, not UTF-8, not JSON, not an
    object)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read {what} {path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read {what} {path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} must hold a JSON object, not a {type(obj).__name__}")
    return obj


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log a run wrote itself (log.jsonl, fidelity.jsonl); none where it is missing."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
