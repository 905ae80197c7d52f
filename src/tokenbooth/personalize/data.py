"""Reference photos in: any size and common format, out: the backbone's square RGB, ready to tokenize.

As Lumina-mGPT prepares images: EXIF orientation applied, transparency composited on white, the short
side resized to the target and the center cropped.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError, warn
from ..images import list_images, to_rgb


def to_square_rgb(image: Image.Image, size: int) -> Image.Image:
    image = to_rgb(ImageOps.exif_transpose(image))
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side),
                        reducing_gap=3.0)  # big images shrink in integer steps first: fast and sharp


def load_reference_images(folder: Path, size: int) -> list[Image.Image]:
    images, small, skipped = [], [], []
    for path in list_images(folder):
        try:
            with Image.open(path) as im:
                im.draft("RGB", (size * 2, size * 2))  # JPEG decodes at reduced scale: huge photos stay cheap
                if min(im.size) < size:
                    small.append(f"{path.name} is {im.size[0]}x{im.size[1]}, smaller than {size}px: upscaling it")
                images.append(to_square_rgb(im, size))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            skipped.append(f"skipping {path.name}: not a readable image ({e.__class__.__name__})")
    if not images:
        raise UserError(f"no readable image in {folder} ({skipped[0].removeprefix('skipping ')})")
    for message in skipped + small:
        warn(message)
    if len(images) == 1:
        warn(f"only one usable image in {folder}: the subject is learned from a single view (the paper uses 3-5)")
    return images
