"""A training run's folder (`tokenbooth train --output`), named and read here alone, as adapter.py does for the
adapter that ends up in the same folder:

    train_config.json          {"config": the TrainConfig, "source": the command's model and image folder};
                               --resume continues exactly that run (early runs wrote the config alone)
    log.jsonl                  one record per step: {"step", "stage", "loss", "seconds"}
    fidelity.jsonl             one record per validation grid: {"step", "stage", "fidelity", "encoder"}
    validation/step-N.png      the validation prompts drawn every --validation-steps, and final.png
    loss.png                   the loss curve (and the fidelity curve under it)
    class_tokens.safetensors   prior preservation's class images, as VQ codes (drawn once)
    checkpoints/step-N/        trainable.safetensors, state.pt (optimizer and RNG states), progress.json

"stage" in the logs is the on-disk word for a stage (config.py: STAGE1 is "embedding", STAGE2 "layers").
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import DiskFull, atomic_path, atomic_write_json, is_disk_full, read_json_object, read_jsonl
from . import adapter as adapter_files
from .config import STAGE1, STAGE1_SETTINGS, TrainConfig

RUN_FILE = "train_config.json"
LOG = "log.jsonl"
FIDELITY_LOG = "fidelity.jsonl"
VALIDATION = "validation"
LOSS_PLOT = "loss.png"
CLASS_TOKENS = "class_tokens.safetensors"
CHECKPOINTS = "checkpoints"
TRAINABLE = "trainable.safetensors"  # in a checkpoint: [V] ("placeholder") and trained layers ("layer.NAME")
STATE = "state.pt"  # in a checkpoint: {"optimizer", "generator", "torch_rng"}
PROGRESS = "progress.json"  # in a checkpoint: RunState; a folder without it is not a checkpoint


@dataclass
class RunState:
    """Where the run is: progress.json in each checkpoint."""
    stage_index: int = 0
    step: int = 0  # within the stage
    global_step: int = 0


# --- the settings ---------------------------------------------------------------------------------------

def write_run(out: Path, cfg: TrainConfig, source: dict | None) -> None:
    atomic_write_json(Path(out) / RUN_FILE, {"config": asdict(cfg), "source": source or {}})


def read_run(out: Path) -> tuple[TrainConfig, dict]:
    """The settings and source of the run in `out` (train_config.json), for resuming it."""
    path = Path(out) / RUN_FILE
    if not path.is_file():
        raise UserError(f"nothing to resume in {out} (no {RUN_FILE})")
    saved = _with_source(read_json_object(path, "run settings"))
    try:
        return TrainConfig(**saved["config"]), dict(saved.get("source") or {})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} does not describe a run: {e}") from None


def run_config(out: Path) -> dict:
    """train_config.json's TrainConfig fields as written, {} where there is none (yet) or it cannot be read:
    for a reader that only shows them (the web app)."""
    try:
        saved = json.loads((Path(out) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return _with_source(saved)["config"] if isinstance(saved, dict) else {}


def _with_source(saved: dict) -> dict:
    """{"config": ..., "source": ...}; early runs wrote the config alone, before the source was recorded."""
    return saved if "config" in saved else {"config": saved}


# --- logs and pictures -------------------------------------------------------------------------------------

def append_record(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        if is_disk_full(e):  # a line cut short is dropped on resume (truncate_log)
            raise DiskFull(path) from None
        raise


def truncate_log(path: Path, last_step: int) -> None:
    """Drops the records past `last_step`: an interrupted run may have logged past its last checkpoint."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _step(line) is not None and _step(line) <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _step(line: str) -> int | None:
    """A log line's step; None for a line cut short (the disk filled up while it was appended)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def validation_picture(out: Path, step: int | None) -> Path:
    """validation/step-N.png, or validation/final.png for step None."""
    return Path(out) / VALIDATION / ("final.png" if step is None else f"step-{step}.png")


def validation_pictures(out: Path) -> list[Path]:
    """validation/step-N.png in step order, final.png last."""
    folder = Path(out) / VALIDATION
    steps = sorted(folder.glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    return steps + [p for p in [validation_picture(out, None)] if p.is_file()]


# --- checkpoints ---------------------------------------------------------------------------------------------

def checkpoint_folder(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step}"


def latest_checkpoint(out: Path) -> Path | None:
    folders = [p for p in (Path(out) / CHECKPOINTS).glob("step-*") if (p / PROGRESS).exists()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_checkpoint(out: Path, state: RunState, tensors: dict, saved_state: dict) -> None:
    """checkpoints/step-N/, complete or not at all: written beside, then renamed (a failed write, a full disk,
    leaves nothing of it; the files follow the umask, as the run's others do)."""
    final = checkpoint_folder(out, state.global_step)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with atomic_path(tmp / TRAINABLE) as path:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        with atomic_path(tmp / STATE) as path:
            torch.save(saved_state, path)
        atomic_write_json(tmp / PROGRESS, asdict(state))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the room it took is given back
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def checkpoint_bytes(out: Path) -> int:
    """The size on disk of the run's latest checkpoint (0 where there is none)."""
    latest = latest_checkpoint(out)
    return sum(f.stat().st_size for f in latest.iterdir() if f.is_file()) if latest else 0


def read_checkpoint(folder: Path) -> tuple[dict, dict, RunState]:
    """(trainable tensors, {"optimizer", "generator", "torch_rng"}, RunState) of a checkpoint folder."""
    tensors = load_file(str(folder / TRAINABLE))
    saved = torch.load(folder / STATE, weights_only=True)
    progress = json.loads((folder / PROGRESS).read_text())
    return tensors, saved, RunState(progress["stage_index"], progress["step"], progress["global_step"])


# --- starting from another run's stage 1 -----------------------------------------------------------------

def stage1_checkpoint(backbone, cfg: TrainConfig, folder: Path) -> Path:
    """The checkpoint that ends stage 1 in `folder` (every run keeps it), refused unless that stage 1 is the
    one `cfg` would train, on the same base."""
    if cfg.stages != "two-stage":
        raise UserError(f"only a two-stage run can start from a finished stage 1 (this one is {cfg.stages})")
    if not (folder / RUN_FILE).is_file():
        raise UserError(f"{folder} holds no training run to take stage 1 from (no {RUN_FILE})")
    saved, _ = read_run(folder)
    for name in STAGE1_SETTINGS:
        if getattr(saved, name) != getattr(cfg, name):
            raise UserError(f"the stage 1 in {folder} was trained with {name} {getattr(saved, name)!r}, this run "
                            f"asks for {getattr(cfg, name)!r}")
    if (folder / adapter_files.CONFIG).is_file():
        recorded = read_json_object(folder / adapter_files.CONFIG, "adapter config").get("base_fingerprint")
        if recorded != adapter_files.base_fingerprint(backbone.folder):
            raise UserError(f"the stage 1 in {folder} was trained on another base model than {backbone.name}")
    checkpoint = checkpoint_folder(folder, cfg.stage1_steps)
    if not (checkpoint / PROGRESS).is_file():
        raise UserError(f"{folder} holds no finished stage 1 (no {CHECKPOINTS}/step-{cfg.stage1_steps})")
    return checkpoint


def start_from_stage1(checkpoint: Path, out: Path) -> None:
    """Copies a finished stage 1 (its checkpoint, and its loss and fidelity log lines) into `out`: the run then
    goes on as one resumed at the end of its own stage 1, and `train --resume` can continue it like any other."""
    step = int(checkpoint.name.split("-")[1])
    tmp = out / CHECKPOINTS / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    os.replace(tmp, out / CHECKPOINTS / checkpoint.name)
    for name in (LOG, FIDELITY_LOG):
        log = checkpoint.parent.parent / name
        if log.exists():
            # a stage-1-only run's "final" grid is its [V] at the end of stage 1, where this run goes on
            records = [{**r, "stage": STAGE1} if r.get("stage") == "final" else r
                       for r in read_jsonl(log) if r["step"] <= step]
            with atomic_path(out / name) as tmp_log:
                tmp_log.write_text("".join(json.dumps(r) + "\n" for r in records))
