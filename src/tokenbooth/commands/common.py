"""What several commands share: the parser that reports mistakes in one line, number types that refuse
nan and inf, the --model and sampling flags, and how given flags become a config's overrides.

Flags whose default depends on the model family default to None ("the family's value"); their help shows the
values from backbones/families.py, the one table that decides them.
"""

from __future__ import annotations

import argparse
import math

import torch

from ..backbones import load_backbone
from ..backbones.families import DEFAULT_MODEL, FAMILIES, PAPER
from ..errors import UserError
from ..sampling.coupling import COUPLINGS
from ..sampling.draw import SAMPLERS
from ..sampling.processors import SamplingConfig, check_sampling_values
from ..sampling.sjd import INITS

MODEL_HELP = (f"mini, lumina-mgpt-7b-512|768|1024, janus-pro-1b|7b, emu3-gen (from the Hugging Face cache), or a model "
              f"folder (default: {DEFAULT_MODEL})")


class UsageError(UserError):
    """A flag argparse could not parse: the CLI exits with 2, as argparse would."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage and exits; we want one line and no SystemExit
        # main() prints "tokenbooth: error: "; a subcommand's own name follows it ("plan: ...")
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise UsageError(f"{command}{message} (see {self.prog} --help)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def family_default(kind: str, field: str) -> str:
    """'default: the model family's: lumina-mgpt X (paper), janus-pro Y, ...' for --help, every value read from
    the family table (backbones/families.py), so the help cannot drift from what a run uses."""
    values = [f"{name} {getattr(d, kind)[field]}" + (" (paper)" if d is PAPER else "") for name, d in FAMILIES.items()]
    return f"default: the model family's: {', '.join(values)}"


def add_model_flags(p: argparse.ArgumentParser, placement: bool = True) -> None:
    p.add_argument("--model", help=MODEL_HELP)
    if placement:
        p.add_argument("--resolution", type=int,
                       help="image size of a Lumina-mGPT folder whose name does not say it; Emu3's side in pixels, "
                            "a multiple of 8 (default: 720)")
        p.add_argument("--device", help="cpu, cuda, cuda:N, or auto (layers spread over all GPUs); default: cuda if "
                                        "there is one")


def check_device(device: str | None) -> None:
    """--device names a device torch knows and this machine has ("auto" spreads layers over all GPUs)."""
    if device is None or device == "auto":
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no GPU is visible to torch")


def load_model(args, quantize: str = "none"):
    check_device(getattr(args, "device", None))
    return load_backbone(args.model or DEFAULT_MODEL, resolution=getattr(args, "resolution", None),
                         device=getattr(args, "device", None), quantize=quantize)


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    defaults = SamplingConfig.__dataclass_fields__
    window, sampler = defaults["sjd_window"].default, defaults["sampler"].default

    p.add_argument("--sampler", choices=SAMPLERS, default=sampler,
                   help=f"sjd: speculative Jacobi decoding, the same distribution in fewer forward passes (on mini "
                        f"3.6x fewer, 1.95x faster for one image on 2 CPU cores: docs/speed.md) (default: {sampler})")
    p.add_argument("--sjd-window", type=positive_int, metavar="L",
                   help=f"draft tokens per SJD pass (default: {window})")
    p.add_argument("--sjd-init", choices=INITS,
                   help="how SJD fills new draft positions: the token one row above (default) or a random one")
    p.add_argument("--sjd-coupling", choices=COUPLINGS,
                   help="how SJD re-draws drafts it has not verified yet: coupled with the previous draft (maximal, "
                        "the default, or gumbel: MC-SJD) or independently (none); the same distribution either way")
    p.add_argument("--sjd-proactive", type=int, metavar="D",
                   help="SJD's proactive branch: D tokens beside the window repeating the last fixed token, so a "
                        "pass whose first draft is rejected in favour of that token goes on; 0 = off (default: "
                        f"{defaults['sjd_proactive'].default}); the same distribution either way")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Every sampling setting; those not given come from the adapter (if any), then the model's family."""
    p.add_argument("--cfg", type=finite_float, help="classifier-free guidance scale; " + family_default("sample", "cfg_scale"))
    p.add_argument("--top-k", type=int, help="image top-k, clipped to the codebook; " + family_default("sample", "image_top_k"))
    p.add_argument("--top-p", type=finite_float, help="nucleus sampling mass (default: 1.0 = off)")
    p.add_argument("--temperature", type=finite_float, help="< 1.0 = less random (default: 1.0)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step (slow)")
    add_sampler_flags(p)


SAMPLING_FLAGS = {"cfg": "cfg_scale", "top_k": "image_top_k", "top_p": "top_p", "temperature": "temperature",
                  "sampler": "sampler", "sjd_window": "sjd_window", "sjd_init": "sjd_init",
                  "sjd_coupling": "sjd_coupling", "sjd_proactive": "sjd_proactive"}


def sampling_overrides(args) -> dict:
    """The SamplingConfig fields the flags set (only those given), checked before any model loads."""
    if getattr(args, "sampler", "plain") != "sjd":
        for flag in ("sjd_window", "sjd_init", "sjd_coupling", "sjd_proactive"):
            if getattr(args, flag, None) is not None:
                raise UserError(f"--{flag.replace('_', '-')} only applies to --sampler sjd")
    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items()
             if getattr(args, flag, None) is not None}
    if getattr(args, "no_kv_cache", False):
        given["kv_cache"] = False
    check_sampling_values(given)
    return given
