"""Reading a scene's key attributes back from pixels: background, object color, position.

Used to measure prompt adherence of generated images: ask mini for "a green robot in the snow, on the
left", then check what the picture shows. It knows nothing but the renderer's backgrounds and palette:
- background: the empty background whose mean image is closest on the median pixel (the object covers
  well under half of the picture, so the median pixel is background);
- object: pixels far from that background, measured against how much the background itself varies;
- position: where the object's pixels sit horizontally;
- color: the palette color most of the object's pixels are nearest to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .render import render_background
from .world import BACKGROUNDS, COLORS

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
PALETTE_NAMES = list(COLORS)


@dataclass
class Reading:
    background: str
    color: str | None  # None when no object was found
    position: str | None
    object_pixels: int


@lru_cache(maxsize=8)
def _background_models(size: int):
    """Per background: mean image and per-pixel spread over random seeds."""
    means, spreads = [], []
    for name in BACKGROUNDS:
        stack = np.stack([np.asarray(render_background(name, seed, size), dtype=np.float32) for seed in range(24)])
        means.append(stack.mean(0))
        spreads.append(np.linalg.norm(stack - stack.mean(0), axis=-1).mean(0))
    return np.stack(means), np.stack(spreads)


def read_scene(image) -> Reading:
    """image: PIL image (any size; read at its own size)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    means, spreads = _background_models(px.shape[0])
    dist = np.linalg.norm(px[None] - means, axis=-1)  # (backgrounds, H, W)
    bg = int(np.argmin(np.median(dist.reshape(len(BACKGROUNDS), -1), axis=1)))
    mask = dist[bg] > 45 + 2.0 * spreads[bg]
    n = int(mask.sum())
    if n < max(4, px.shape[0] * px.shape[1] // 100):
        return Reading(BACKGROUNDS[bg], None, None, n)
    xs = np.nonzero(mask)[1] / (px.shape[1] - 1)
    cx = float(np.median(xs))
    position = "left" if cx < 0.44 else "right" if cx > 0.56 else "center"
    to_palette = np.linalg.norm(px[mask][:, None] - PALETTE[None], axis=-1)
    nearest, how_near = to_palette.argmin(1), to_palette.min(1)
    # Edge pixels blend object and background into colors of neither: count clean pixels when there are some.
    clean = how_near < 70
    votes = nearest[clean] if clean.sum() >= 3 else nearest
    color = PALETTE_NAMES[int(np.bincount(votes, minlength=len(PALETTE)).argmax())]
    return Reading(BACKGROUNDS[bg], color, position, n)
