"""Training jobs: a FIFO queue, one training at a time, each run as `tokenbooth train` in a child process.

The child is the command-line tool itself, so the app has no second implementation of training: it writes
the adapter folder as `tokenbooth train --output` always does (log.jsonl every step, validation/step-N.png,
checkpoints/step-N, train_config.json). The job therefore lives on disk, not in a browser tab: a reload or a
second tab reads the same folder, Cancel terminates the child, and a server that dies takes its child with it
(child.py) and finds the job on restart as "interrupted", resumable with `train --resume` from its last
complete checkpoint.

Job states: queued -> running -> done | failed | cancelled; queued/running found at start-up -> interrupted.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json
from ..personalize.adapter import CONFIG as ADAPTER_CONFIG
from ..personalize.recipe import TrainConfig, latest_checkpoint
from .workspace import JOB_FILE, REFERENCES, TRAIN_LOG, Workspace

UNFINISHED = ("interrupted", "cancelled", "failed")  # states a job can be resumed from
ERROR_PREFIX = "tokenbooth: error: "  # how cli.main reports a UserError


def train_flags(cfg: TrainConfig) -> list[str]:
    """`tokenbooth train` flags that reproduce `cfg` field by field (every TrainConfig field has its flag)."""
    flags = []
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "validation_prompts":
            for prompt in value:
                flags += ["--validation-prompt", prompt]
        elif isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, str(value)]
    if cfg.class_name is None:
        flags.append("--no-class-name")
    return flags


@dataclass
class Job:
    name: str  # the subject's folder under WORKSPACE/subjects
    model: str
    flags: list[str]  # train flags of a fresh start; a resume reads train_config.json instead
    state: str = "queued"
    error: str | None = None
    log_tail: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def save(self, workspace: Workspace) -> None:
        atomic_write_json(workspace.subject_folder(self.name) / JOB_FILE, asdict(self))

    @classmethod
    def load(cls, workspace: Workspace, name: str) -> "Job | None":
        subject = workspace.subject(name)
        record = subject.job()
        if not record:
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def settings_from_flags(flags: list[str]) -> dict:
    """train_flags read back, {"stage1_steps": "3", "prior_preservation": True, ...}: what a job was asked to
    train, for a page that shows it before the run has written train_config.json."""
    settings, i = {}, 0
    while i < len(flags):
        key = flags[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            settings[key], i = flags[i + 1], i + 2
        else:
            settings[key], i = True, i + 1
    return settings


def checkpoint_step(folder: Path) -> int | None:
    """The step a resume of the run in `folder` starts from (its last complete checkpoint), None: from scratch."""
    checkpoint = latest_checkpoint(folder)
    return None if checkpoint is None else int(checkpoint.name.split("-")[1])


def train_command(workspace: Workspace, job: Job) -> list[str]:
    """The child's argv: `tokenbooth train`, resuming from the last checkpoint when there is one."""
    folder = workspace.subject_folder(job.name)
    argv = [sys.executable, "-m", "tokenbooth.ui.child", "train", "--model", job.model,
            "--images", str(folder / REFERENCES), "--output", str(folder)]
    return argv + (["--resume"] if latest_checkpoint(folder) is not None else job.flags)


def child_env() -> dict:
    """The server's environment, with tokenbooth importable (also when it runs from a source tree) and no
    progress bars (the app reads log.jsonl)."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "TOKENBOOTH_UI_PARENT": str(os.getpid())}


def error_from_log(text: str, returncode: int) -> str:
    """The line a user needs: the CLI's one-line error, else the last line of a traceback."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):]
    last = lines[-1] if lines else "no output"
    return f"training stopped with exit code {returncode}: {last}"


class JobQueue:
    """One worker thread takes jobs in submission order and runs each to its end before the next."""

    def __init__(self, workspace: Workspace, command=train_command, on_start=None):
        self.workspace = workspace
        self._command = command  # (workspace, job) -> argv; tests substitute a quick stand-in
        self._on_start = on_start  # called before each training: the app frees the models it holds
        self._lock = threading.Condition()
        self._waiting: list[Job] = []
        self._running: Job | None = None
        self._process: subprocess.Popen | None = None
        self._cancelled: set[str] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.recovered = self._recover()

    # --- start-up and shutdown ----------------------------------------------------------------------

    def _recover(self) -> list[str]:
        """Jobs a previous server left queued or running: done if the adapter got written, else interrupted."""
        found = []
        for subject in self.workspace.subjects():
            job = Job.load(self.workspace, subject.name)
            if job is None or job.state not in ("queued", "running"):
                continue
            job.state = "done" if (subject.folder / ADAPTER_CONFIG).exists() else "interrupted"
            job.save(self.workspace)
            if job.state == "interrupted":
                found.append(job.name)
        return found

    def start(self) -> "JobQueue":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tokenbooth-jobs", daemon=True)
            self._thread.start()
            atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the running child (its last complete checkpoint stays) and marks it interrupted."""
        with self._lock:
            self._stopping = True
            process = self._process
            self._lock.notify_all()
        if process is not None and process.poll() is None:
            process.terminate()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- what the page asks -------------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queues `job` (saved to its folder first) and returns its place: 0 = runs now, 1 = next, ..."""
        job.state = "queued"
        job.error, job.log_tail, job.started, job.finished = None, "", None, None
        with self._lock:
            if self.active(job.name):
                raise UserError(f"{job.name} is already queued or training")
            job.save(self.workspace)
            self._waiting.append(job)
            self._lock.notify_all()
            return len(self._waiting) - (0 if self._running else 1)

    def resume(self, name: str) -> int:
        job = Job.load(self.workspace, name)
        if job is None or job.state not in UNFINISHED:
            raise UserError(f"{name} has no unfinished training to resume")
        return self.submit(job)

    def cancel(self, name: str) -> str:
        """Takes a waiting job out of the queue, or stops the running one; returns which it was ("waiting",
        "running"). The next job starts only once a stopped one has ended."""
        with self._lock:
            for job in self._waiting:
                if job.name == name:
                    self._waiting.remove(job)
                    job.state, job.finished = "cancelled", time.time()
                    job.save(self.workspace)
                    return "waiting"
            if self._running is None or self._running.name != name:
                raise UserError(f"{name} is not queued or training")
            self._cancelled.add(name)
            process = self._process
        if process is not None:
            process.terminate()
        return "running"

    def running(self) -> Job | None:
        with self._lock:
            return self._running

    def waiting(self) -> list[Job]:
        """Queued jobs in the order they will run."""
        with self._lock:
            return list(self._waiting)

    def active(self, name: str) -> bool:
        with self._lock:
            running = self._running is not None and self._running.name == name
            return running or any(j.name == name for j in self._waiting)

    def unfinished(self) -> list[str]:
        """Subjects whose training stopped before its end and can be resumed, newest first."""
        jobs = [Job.load(self.workspace, s.name) for s in self.workspace.subjects()]
        jobs = [j for j in jobs if j is not None and j.state in UNFINISHED and not self.active(j.name)]
        return [j.name for j in sorted(jobs, key=lambda j: -(j.finished or j.created))]

    # --- the worker ---------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                job = self._waiting.pop(0)
                self._running = job
            try:
                self._run(job)
            except Exception as e:  # the server keeps serving whatever happens to one job
                job.state, job.error = "failed", f"{e.__class__.__name__}: {e}"
                job.finished = time.time()
                job.save(self.workspace)
            finally:
                with self._lock:
                    self._running, self._process = None, None
                    self._cancelled.discard(job.name)

    def _run(self, job: Job) -> None:
        if self._on_start is not None:
            self._on_start(job)
        folder = self.workspace.subject_folder(job.name)
        job.state, job.started = "running", time.time()
        job.save(self.workspace)
        log_path, argv = folder / TRAIN_LOG, self._command(self.workspace, job)
        with open(log_path, "ab") as log:
            log.write(f"\n$ {' '.join(argv[1:])}\n".encode())
            log.flush()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=child_env(), cwd=folder,
                                       start_new_session=True)  # Ctrl-C in the terminal is the server's to handle
            with self._lock:
                self._process = process
                stop_now = self._stopping or job.name in self._cancelled
            if stop_now:
                process.terminate()
            returncode = process.wait()
        with self._lock:
            cancelled, stopping = job.name in self._cancelled, self._stopping
        job.finished = time.time()
        if returncode == 0 and (folder / ADAPTER_CONFIG).exists():
            job.state = "done"
        elif cancelled:
            job.state = "cancelled"
        elif stopping:
            job.state = "interrupted"
        else:
            text = _tail(log_path)
            job.state, job.error, job.log_tail = "failed", error_from_log(text, returncode), text[-3000:]
        job.save(self.workspace)


def _tail(path: Path, size: int = 20000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")
