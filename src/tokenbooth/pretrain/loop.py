"""What every pretraining script here shares (mini, the reader, toyDINO, toyCLIP, the v3 pilot): a timestamped
log line, checkpoints that appear whole and load without pickles, resuming from them, the CPU's denormals, the
learning-rate schedule, and command-line options read from a run's dataclass."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import fields
from pathlib import Path

import torch

from ..io import atomic_path


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def save_checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path):
    """On the CPU whatever device wrote it (a run begun on a GPU resumes on a laptop): the model's and the
    optimizer's load_state_dict copy each tensor to where its parameter lives."""
    return torch.load(path, weights_only=True, map_location="cpu") if path.exists() else None


def resume(path: Path, what: str, optimizer, **modules) -> int:
    """Loads `path` into the optimizer and the named modules when a checkpoint is there; returns its step (0
    for a fresh start). Checkpoints hold {"opt", "step", and one state dict per module name}."""
    if (ck := load_checkpoint(path)) is None:
        return 0
    for name, module in modules.items():
        module.load_state_dict(ck[name])
    optimizer.load_state_dict(ck["opt"])
    log(f"{what}: resumed at step {ck['step']}")
    return ck["step"]


def zero_denormals(optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments for parameters that get no gradient (unused codes, unseen tokens) decay towards
    denormal floats, which CPU kernels process many times slower: the whole run slowed 10x without this.
    (torch.set_flush_denormal only covers the calling thread, not the worker threads.)"""
    for state in optimizer.state.values():
        for t in state.values():
            if torch.is_tensor(t) and t.is_floating_point() and t.dim() > 0:
                t.masked_fill_(t.abs() < 1e-30, 0.0)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters, max_norm: float = 1.0) -> float:
    """One update: gradients of `loss`, clipped to `max_norm` over `parameters`; returns the loss as a float."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.step()
    return loss.item()


class StepLog:
    """A line every `every` steps: the mean loss over them and the wall-clock and CPU seconds a step (CPU time
    is the fair measure on a machine other jobs share)."""

    def __init__(self, what: str, every: int = 5):
        self.what, self.every = what, every
        self._start()

    def _start(self) -> None:
        self.wall, self.cpu, self.total = time.time(), time.process_time(), 0.0

    def add(self, step: int, loss: float, note: str = "") -> None:
        self.total += loss
        if step % self.every == 0:
            n = self.every
            log(f"{self.what} step {step} loss {self.total / n:.4f}{note} ({(time.time() - self.wall) / n:.2f} s, "
                f"{(time.process_time() - self.cpu) / n:.2f} CPU s a step)")
            self._start()


def warmup_cosine(peak: float, step: int, steps: int, warmup: int = 1) -> float:
    """The rate at `step` of a schedule that warms up linearly over `warmup` steps (1: no warm-up) and decays
    to zero by a cosine over `steps`."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


COMPUTE_DTYPES = ("float32", "bfloat16")  # a run's matrix products; bfloat16 is fast on AMX / AVX512-BF16 and GPUs


def add_run_options(ap: argparse.ArgumentParser, run_class) -> None:
    """One --option for each field of a run's dataclass after its name (--steps, --lr, ...), with the field's
    type and default, so that a new field is a new option without a second list to keep in step."""
    for f in fields(run_class)[1:]:
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                        choices=COMPUTE_DTYPES if f.name == "compute_dtype" else None)


def run_from_options(run_class, name: str, args: argparse.Namespace):
    """The run that `add_run_options`' options describe."""
    return run_class(name, **{f.name: getattr(args, f.name) for f in fields(run_class)[1:]})
