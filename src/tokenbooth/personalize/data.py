"""Reference photos in: any size and common format, out: the backbone's square RGB, ready to tokenize.

As Lumina-mGPT prepares images: EXIF orientation applied, transparency composited on white, the short
side resized to the target and the center cropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def warn(message: str) -> None:
    print(f"tokenbooth: warning: {message}", file=sys.stderr)


def to_square_rgb(image: Image.Image, size: int) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)  # big images shrink in integer steps first: fast and sharp


def load_reference_images(folder: Path, size: int) -> list[Image.Image]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size * 2, size * 2))  # JPEG decodes at reduced scale: huge photos stay cheap
                if min(im.size) < size:
                    warn(f"{path.name} is {im.size[0]}x{im.size[1]}, smaller than {size}px: upscaling it")
                images.append(to_square_rgb(im, size))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            warn(f"skipping {path.name}: not a readable image ({e.__class__.__name__})")
    if not images:
        raise UserError(f"no readable image in {folder}")
    return images
