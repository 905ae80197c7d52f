"""Loading a Hugging Face checkpoint folder the way every backbone wants it: from disk only, SDPA attention,
the checkpoint's own dtype (bf16 for the published models) unless told otherwise, and refused rather than
silently patched with random weights when the files do not fill the model."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError
from .quantize import quantize_layers

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def resolve_device(device: str | None) -> str:
    """None: the GPU when there is one (this process's own under `accelerate launch`/torchrun, which set
    LOCAL_RANK). "auto": spread the layers over every visible GPU (accelerate's device map), for a model
    that does not fit on one."""
    if not device:
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{os.environ['LOCAL_RANK']}" if os.environ.get("LOCAL_RANK", "").isdigit() else "cuda"
    return device


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"model file missing: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def require(path: Path, what: str = "model file") -> Path:
    if not Path(path).is_file():
        raise UserError(f"{what} missing: {path}")
    return Path(path)


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints a load report table and progress bars; tokenbooth reports problems itself."""
    from transformers.utils import logging as hf_logging  # transformers' submodules: here for start-up time

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_pretrained(cls, folder: Path, *, dtype=None, device: str | None = None, optional=(), accept_mismatch=None,
                    quantize: str = "none", decoder_layers=None):
    """`cls.from_pretrained(folder)` with tokenbooth's rules. Parameters whose name contains one of `optional`
    may be absent from the files; `accept_mismatch(name, shape_in_file, shape_in_model)` may accept a shape
    difference the caller then repairs. quantize: "int8" or "nf4" stores the Linear weights of
    `decoder_layers(model)` quantized (backbones/quantize.py), done on the CPU before the model moves to its
    device, so the device never holds the full-precision model. Returns (model in eval mode, the accepted
    mismatches)."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise UserError(f"model file missing: {folder / 'model.safetensors'} (or sharded model-*.safetensors with "
                        f"model.safetensors.index.json)")
    if quantize != "none" and device == "auto":
        raise UserError(f"--quantize {quantize} puts the model on one device; leave out --device auto")
    target = resolve_device(device)
    device = "cpu" if quantize != "none" else target
    # device_map puts each weight where it belongs as it is read: no CPU copy of a 14 GB model on the way
    kwargs = dict(dtype=dtype or "auto", local_files_only=True, output_loading_info=True,
                  ignore_mismatched_sizes=True, attn_implementation="sdpa", device_map=device)
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(folder, **kwargs)
    except (OSError, SafetensorError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the transformer in {folder}: {first_line}") from None
    missing = [k for k in info["missing_keys"] if not any(o in k for o in optional)]
    unexpected = sorted(info["unexpected_keys"])
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: m[0])
    refused = [m for m in mismatched if accept_mismatch is None or not accept_mismatch(*m)]
    if missing or unexpected or refused:
        if refused:
            name, in_file, in_model = refused[0]
            detail = f"{name} is {list(in_file)} in the files, {list(in_model)} by the config"
        elif missing:
            detail = f"{missing[0]} is missing from the files"
        else:
            detail = f"the files hold {unexpected[0]}, which the config does not build"
        raise UserError(f"weights in {folder} do not match its config.json: {detail}")
    if quantize != "none":
        quantize_layers(decoder_layers(model), quantize)
        model.to(target)
    return model.eval(), [m for m in mismatched if m not in refused]


CPU_FLOAT32_SDPA = "tokenbooth_sdpa"  # the attention_implementation name `use_float32_attention_on_cpu` registers


def float32_sdpa_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, computed in float32 on the CPU where it would run in bfloat16 (autocast,
    or a bfloat16 model; Chameleon's rotary embedding already hands float32 queries and keys): PyTorch's CPU
    flash-attention kernel is slower in bfloat16 than in float32 (about 1.37x at mini's training shapes; whole
    training steps 1.07-1.13x faster, benchmarks/attention.py), and float32 is the more precise. On a GPU, or
    for float32 input, plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # start-up time, as above

    lowered = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if query.device.type != "cpu" or not (lowered or value.dtype == torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):  # autocast would cast SDPA's inputs back to bfloat16
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(value.dtype), weights


def use_float32_attention_on_cpu(model) -> None:
    """Switches a transformers model to `float32_sdpa_on_cpu`, registered with transformers by name together
    with SDPA's mask builder: without one, transformers hands an unknown implementation the raw 2-D padding
    mask, and a padded batch attends without causality."""
    from transformers import AttentionInterface  # start-up time, as above
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(CPU_FLOAT32_SDPA, float32_sdpa_on_cpu)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CPU_FLOAT32_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(CPU_FLOAT32_SDPA)


def read_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Selected tensors straight from a folder's safetensors files (single or sharded)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {n: "model.safetensors" for n in names}
    out = {}
    for name in names:
        with safe_open(str(folder / where[name]), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out
