"""Model families behind one protocol (`base.Backbone`), loaded by name or by path.

A folder's config.json says which family reads it (model_type "chameleon": Lumina-mGPT and mini, "janus":
Janus-Pro, "emu3": Emu3). Names load from the package (mini) or from the local Hugging Face cache (the published
models); nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ..assets import MINI_DIR
from ..errors import UserError
from . import chameleon, emu3, janus
from .base import Backbone, ImageLayout  # noqa: F401 (the protocol, importable from the package)
from .hf import read_config
from .hub import cached_snapshot

# Names users can type; each maps to a folder that ships with the package.
BUILTIN = {"mini": MINI_DIR}
# What marks an adapter folder (personalize/adapter.py's CONFIG, named again here because backbones sit below
# personalize): one given as a model is pointed to --adapter.
ADAPTER_CONFIG = "adapter_config.json"


def presets() -> dict[str, tuple[str, int]]:
    """Published checkpoints by name: (Hub repository, resolution)."""
    return {**chameleon.PRESETS, **janus.PRESETS, **emu3.PRESETS}


def loaders() -> dict:
    """config.json model_type -> the family's loader."""
    return {"chameleon": chameleon.load_chameleon, "janus": janus.load_janus, "emu3": emu3.load_emu3,
            emu3.ORIGINAL_MODEL_TYPE: emu3.refuse_original}


def load_backbone(name_or_path: str, resolution: int | None = None, device: str | None = None,
                  dtype=None, quantize: str = "none") -> Backbone:
    """`mini`, a published model's name (lumina-mgpt-7b-768, janus-pro-1b, emu3-gen, ...) or a path to a model folder.

    resolution: for a Lumina-mGPT folder whose name does not say it. device: None = the GPU if there is one,
    "auto" = layers spread over all GPUs. dtype: None = the checkpoint's own (bf16 for the published models).
    quantize: "int8" or "nf4" for a frozen base in 8 or 4 bits (backbones/quantize.py), quantized on the CPU."""
    known = presets()
    if name_or_path in BUILTIN:
        folder, name = BUILTIN[name_or_path], name_or_path
        if not (folder / "model.safetensors").is_file():
            raise UserError(f"the bundled {name} weights are missing from {folder}; train them with "
                            f"`python -m tokenbooth.pretrain.mini all`")
    elif name_or_path in known:
        name = name_or_path
        folder = cached_snapshot(known[name][0], name)
    else:
        folder, name = Path(name_or_path).expanduser(), None
        if not folder.exists():
            names = ", ".join([*sorted(BUILTIN), *sorted(known)])
            raise UserError(f"unknown model {name_or_path!r}: not a known name ({names}) and no such folder")
        if not folder.is_dir():
            raise UserError(f"model path {folder} is not a folder")
        if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
            raise UserError(f"{folder} is an adapter folder, not a model: pass it as --adapter, with its base model "
                            f"as --model")
    config = read_config(folder)
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} must hold a JSON object, not a {type(config).__name__}")
    model_type = config.get("model_type")
    load = loaders().get(model_type)
    if load is None:
        raise UserError(f"{folder} holds a {model_type!r} model; tokenbooth reads chameleon (Lumina-mGPT, mini), "
                        f"janus (Janus-Pro) and emu3 (Emu3) checkpoints")
    return load(folder, name, dtype=dtype, resolution=resolution, device=device, quantize=quantize)

