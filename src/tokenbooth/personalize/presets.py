"""Training presets: named variations on a family's defaults (backbones/families.py), as the web app offers
them. A preset shortens or keeps the family's stages; every other number still comes from the family table."""

from __future__ import annotations

from ..errors import UserError
from .config import TrainConfig

QUICK_FRACTION = 5  # the "quick" recipe: a fifth of the family's steps, a first look in a fifth of the time

# Preset name -> what each stage's step count is divided by. The first is the default.
PRESETS = {"family defaults": 1, "quick": QUICK_FRACTION}


def preset_config(family: str, preset: str, **overrides) -> TrainConfig:
    """The family's training defaults with the preset's stage lengths, then `overrides` on top."""
    if preset not in PRESETS:
        raise UserError(f"unknown training preset {preset!r} (known: {', '.join(PRESETS)})")
    fraction = PRESETS[preset]
    base = TrainConfig.for_family(family)
    shorter = {} if fraction == 1 else {"stage1_steps": max(1, base.stage1_steps // fraction),
                                        "stage2_steps": max(1, base.stage2_steps // fraction)}
    return TrainConfig.for_family(family, **{**shorter, **overrides})
