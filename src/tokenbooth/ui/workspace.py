"""The app's folder on disk. Everything the app knows lives here, so a restarted server finds it all again:

    WORKSPACE/subjects/NAME/      one subject: exactly the folder `tokenbooth train --output` writes
        references/               the uploaded pictures (the training command's --images)
        job.json                  the app's record of the training job (model, flags, state, error)
        train.log                 the training command's output
        adapter_config.json ...   the adapter, log.jsonl, validation/, checkpoints/ (personalize/run_folder.py)
    WORKSPACE/generations/        generated PNGs, each with its settings in a text chunk
    WORKSPACE/exports/            subject zips for download

An adapter written by `tokenbooth train --output WORKSPACE/subjects/NAME` shows up like one the app made.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..io import atomic_path
from ..personalize.adapter import CONFIG as ADAPTER_CONFIG
from ..personalize.placeholder import PLACEHOLDER
from ..images import IMAGE_SUFFIXES
from ..personalize import run_folder
from ..personalize.run_folder import RUN_FILE as RUN_CONFIG

MAX_IMAGES = 10  # reference pictures per subject: the paper uses 3-5, DreamBench subjects have 4-6
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per upload; phone photos are 2-10 MB
MAX_NAME = 64  # characters
MAX_NAME_BYTES = 200  # as UTF-8: file systems allow 255, and .NAME.deleting-<ns> must fit too
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
JOB_FILE = "job.json"
TRAIN_LOG = "train.log"
REFERENCES = "references"
ZIP_SKIPS = (run_folder.CHECKPOINTS, run_folder.CLASS_TOKENS)  # resumable state, not part of the adapter


def sanitize_name(raw: str) -> str:
    """A subject name safe as one folder name on every OS: Unicode letters and digits (NFC, so the same name
    typed on two systems is the same folder), '-', '_' and '.', not starting with a dot or '-'. Spaces become
    '-' and other characters are dropped (the page says the folder name when it differs from what was typed).
    Refused: path separators (a subject is one folder), a trailing dot (Windows drops it), Windows' reserved
    device names (CON, NUL, COM1... with or without an extension) and a name with nothing usable left."""
    typed = unicodedata.normalize("NFC", (raw or "").strip())
    if "/" in typed or "\\" in typed:
        raise UserError(f"{raw!r} holds a path separator: a subject name is one folder name")
    if typed.endswith("."):
        raise UserError(f"{raw!r} ends with a dot, which Windows drops from folder names; remove it")
    name = re.sub(r"\s+", "-", typed)
    name = "".join(ch for ch in name if ch.isalnum() or ch in "-_.").lstrip(".-").rstrip(".")
    while len(name) > MAX_NAME or len(name.encode()) > MAX_NAME_BYTES:  # a long cut may end in '.': strip it
        name = name[:-1].rstrip(".")
    if not name:
        raise UserError(f"{raw!r} is not usable as a subject name: use letters, digits, '-' or '_'")
    if name.split(".")[0].upper() in WINDOWS_RESERVED:
        raise UserError(f"{name!r} is a reserved device name on Windows; choose another subject name")
    return name


def folder_note(typed: str | None, name: str) -> str:
    """" (folder name for '../x')" when the folder is not called what was typed, else ""."""
    typed = (typed or "").strip()
    return "" if not typed or typed == name else f" (folder name for {typed!r})"


@dataclass
class CheckedUploads:
    """The result of checking a batch of uploads: the usable files, and one line per problem."""
    accepted: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.accepted) and not any(p.startswith("too many") for p in self.problems)

    def message(self) -> str:
        lines = [f"{len(self.accepted)} image(s) ready."] if self.accepted else ["No usable image yet."]
        return "\n".join(lines + [f"- {p}" for p in self.problems])


def check_uploads(paths: list[Path]) -> CheckedUploads:
    """The training command's checks on every file (a known image suffix, decodable by Pillow), plus the
    app's limits (at most MAX_IMAGES files of at most MAX_IMAGE_BYTES each). Unreadable files are named."""
    result = CheckedUploads()
    paths = [Path(p) for p in paths or []]
    if len(paths) > MAX_IMAGES:
        result.problems.append(f"too many images ({len(paths)}): at most {MAX_IMAGES}; remove some")
    for path in paths:
        name = path.name  # Gradio keeps an upload's original name as the last component
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            result.problems.append(f"{name}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
            continue
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            result.problems.append(f"{name}: {size / 2**20:.1f} MB, over the {MAX_IMAGE_BYTES // 2**20} MB limit")
            continue
        try:
            with Image.open(path) as im:
                im.load()  # decode fully: a truncated file fails here, not in the middle of training
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            result.problems.append(f"{name}: not a readable image ({e.__class__.__name__})")
            continue
        result.accepted.append(path)
    return result


@dataclass
class Subject:
    name: str
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / ADAPTER_CONFIG).is_file()

    def adapter_config(self) -> dict:
        return _read_json(self.folder / ADAPTER_CONFIG)

    def run_config(self) -> dict:
        """The training settings: the adapter's when finished, the run's (train_config.json) before."""
        if self.finished:
            return self.adapter_config()
        return run_folder.run_config(self.folder)

    def job(self) -> dict:
        return _read_json(self.folder / JOB_FILE)

    def model(self) -> str | None:
        """The backbone to load it onto: the app's job record, else what the adapter says it was trained on."""
        return self.job().get("model") or self.adapter_config().get("backbone")

    def loss_records(self) -> list[dict]:
        return read_log(self.folder / run_folder.LOG)

    def log_written(self) -> float | None:
        """When log.jsonl was last written (a step logged, or the log cut back by a resume), None before."""
        try:
            return (self.folder / run_folder.LOG).stat().st_mtime
        except OSError:
            return None

    def fidelity_records(self) -> list[dict]:
        """The validation grids' fidelity to the references (fidelity.jsonl, personalize/run_folder.py)."""
        return read_log(self.folder / run_folder.FIDELITY_LOG)

    def references(self) -> list[Path]:
        folder = self.folder / REFERENCES
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []

    def validation_images(self) -> list[Path]:
        """validation/step-N.png in step order, final.png last."""
        return run_folder.validation_pictures(self.folder)

    def placeholder_words(self) -> str:
        """"[V] robot": how a prompt names the subject."""
        cfg = self.run_config()
        return " ".join(w for w in (cfg.get("placeholder", PLACEHOLDER), cfg.get("class_name")) if w)


def read_log(path: Path) -> list[dict]:
    """log.jsonl records; a line being written right now (or cut by a kill) is skipped, not fatal."""
    records = []
    try:
        text = path.read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.subjects_dir = self.root / "subjects"
        self.generations_dir = self.root / "generations"
        self.exports_dir = self.root / "exports"
        for folder in (self.subjects_dir, self.generations_dir, self.exports_dir):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the workspace folder {folder}: {e.strerror}") from None

    def subject_folder(self, name: str) -> Path:
        """The folder of subject `name`, which must be a sanitised name: never a path outside subjects/."""
        if name != sanitize_name(name):
            raise UserError(f"{name!r} is not a valid subject name")
        folder = (self.subjects_dir / name).resolve()
        if folder.parent != self.subjects_dir:
            raise UserError(f"{name!r} is not a valid subject name")
        return folder

    def subject(self, name: str) -> Subject:
        folder = self.subject_folder(name)
        if not folder.is_dir():
            raise UserError(f"no subject named {name!r} in {self.subjects_dir}")
        return Subject(name, folder)

    def subjects(self) -> list[Subject]:
        """Every folder that is, or is becoming, an adapter: the app's jobs and `tokenbooth train` runs."""
        found = []
        for folder in sorted(self.subjects_dir.iterdir()):
            markers = (ADAPTER_CONFIG, JOB_FILE, RUN_CONFIG)
            if folder.is_dir() and not folder.name.startswith(".") and any((folder / m).exists() for m in markers):
                found.append(Subject(folder.name, folder))
        return found

    def free_name(self, wanted: str) -> str:
        """`wanted` sanitised, or wanted-2, wanted-3, ... when it is taken."""
        base = sanitize_name(wanted)
        name, i = base, 2
        while (self.subjects_dir / name).exists():
            name, i = f"{base[: MAX_NAME - 4]}-{i}", i + 1
        return name

    def create_subject(self, name: str, images: list[Path]) -> Subject:
        """A new subject folder holding copies of the checked reference pictures."""
        folder = self.subject_folder(name)
        if folder.exists():
            raise UserError(f"a subject named {name!r} already exists; choose another name")
        tmp = self.subjects_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / REFERENCES).mkdir(parents=True)
        for i, path in enumerate(images):
            shutil.copyfile(path, tmp / REFERENCES / f"ref-{i:02d}{Path(path).suffix.lower()}")
        tmp.rename(folder)  # the folder appears with all its pictures or not at all
        return Subject(name, folder)

    def rename(self, old: str, new: str) -> str:
        new = sanitize_name(new)
        src, dst = self.subject(old).folder, self.subject_folder(new)
        if dst.exists():
            raise UserError(f"a subject named {new!r} already exists")
        src.rename(dst)
        return new

    def delete(self, name: str) -> None:
        folder = self.subject(name).folder
        trash = self.subjects_dir / f".{name}.deleting-{time.time_ns()}"
        folder.rename(trash)  # gone from the listing at once, even if removing the files takes a while
        shutil.rmtree(trash, ignore_errors=True)

    def export_zip(self, name: str) -> Path:
        """NAME.zip with the adapter, references, settings, log and validation images (not the checkpoints)."""
        subject = self.subject(name)
        out = self.exports_dir / f"{name}.zip"
        with atomic_path(out) as tmp:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
                for path in sorted(subject.folder.rglob("*")):
                    rel = path.relative_to(subject.folder)
                    if path.is_file() and rel.parts[0] not in ZIP_SKIPS and not rel.name.startswith("."):
                        z.write(path, Path(name) / rel)
        return out
