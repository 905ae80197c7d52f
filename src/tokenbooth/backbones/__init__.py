"""Model families behind one protocol (`base.Backbone`), loaded by name or by path."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import Backbone, ImageLayout

MINI_DIR = Path(__file__).resolve().parent.parent / "zoo" / "mini" / "model"

# Names users can type; each maps to a folder that ships with the package.
BUILTIN = {"mini": MINI_DIR}


def load_backbone(name_or_path: str) -> Backbone:
    """`mini` or a path to a model folder."""
    from .chameleon import load_chameleon

    if name_or_path in BUILTIN:
        folder, name = BUILTIN[name_or_path], name_or_path
        if not (folder / "model.safetensors").is_file():
            raise UserError(f"the bundled {name} weights are missing from {folder}; train them with "
                            f"`python -m tokenbooth.zoo.mini.train all`")
    else:
        folder, name = Path(name_or_path), None
        if not folder.exists():
            known = ", ".join(sorted(BUILTIN))
            raise UserError(f"unknown model {name_or_path!r}: not a known name ({known}) and no such folder")
        if not folder.is_dir():
            raise UserError(f"model path {folder} is not a folder")
    return load_chameleon(folder, name)
