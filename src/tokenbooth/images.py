"""Images in and out, shared by training, scoring and the benchmarks: which files count as images, how any
of them becomes 8-bit RGB, and grids for looking at results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def list_images(folder: Path, what: str = "image folder") -> list[Path]:
    """The image files of a folder (by suffix), in file-name order; `what` names the folder in errors.
    Training, scoring and DreamBench all list their images here."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} not found: {folder}")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise UserError(f"cannot read {what} {folder}: {e.strerror}") from None
    if not files:
        raise UserError(f"no images in {what} {folder} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16- and 32-bit grayscale scaled to 8 bits (Pillow's own
    convert clips them, so a 16-bit PNG would turn white)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:  # a 16-bit file, whatever Pillow calls it
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return image.convert("RGB")


def make_grid(images, columns: int | None = None, min_cell: int = 128, pad: int = 2) -> Image.Image:
    """Images side by side, upscaled with nearest-neighbour so 32 px samples stay crisp and visible."""
    if not images:
        raise ValueError("no images for a grid")
    columns = columns or min(len(images), 8)
    w, h = images[0].size
    scale = max(1, min_cell // max(w, h))
    cw, ch = w * scale, h * scale
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        cell = im.convert("RGB").resize((cw, ch), Image.NEAREST)
        grid.paste(cell, (pad + (i % columns) * (cw + pad), pad + (i // columns) * (ch + pad)))
    return grid


def line_plot(values, title: str = "", size=(640, 360), x_ends: tuple | None = None) -> Image.Image:
    """A minimal line chart drawn with Pillow (no plotting library needed): the loss curve. x_ends labels the
    first and last point (default: 0 and the number of values)."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
    for frac in (0.0, 0.5, 1.0):
        y = top + (1 - frac) * (h - top - bottom)
        d.text((5, y - 6), f"{lo + frac * (hi - lo):.3g}", fill="black")
    first, last = x_ends or (0, len(values))
    d.text((left, h - bottom + 8), str(first), fill="black")
    d.text((w - right - 40, h - bottom + 8), str(last), fill="black")
    d.text((left, 8), title, fill="black")
    n = max(1, len(values) - 1)
    points = [(left + i / n * (w - left - right), top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom))
              for i, v in enumerate(values)]
    if len(points) > 1:
        d.line(points, fill=(30, 90, 200), width=2)
    return img


def labeled_rows(rows: list[tuple[str, list]], min_cell: int = 96, label_width: int = 230, pad: int = 2) -> Image.Image:
    """One row of images per (label, images), the label written on the left: comparison figures."""
    w, h = rows[0][1][0].size
    scale = max(1, min_cell // max(w, h))
    cw, ch = w * scale, h * scale
    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + columns * (cw + pad) + pad, len(rows) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (ch + pad)
        draw.text((6, y + ch // 2 - 6), label, fill="black")
        for c, im in enumerate(images):
            sheet.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (label_width + pad + c * (cw + pad), y))
    return sheet
