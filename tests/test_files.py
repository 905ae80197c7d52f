"""Files in and out: which files are images, how any image becomes 8-bit RGB, and what atomic writes leave."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from tokenbooth.errors import UserError
from tokenbooth.eval.metrics import read_images
from tokenbooth.io import atomic_save_image, atomic_write_json
from tokenbooth.personalize import load_reference_images


def gray16(path, size=16):
    """A 16-bit grayscale PNG, dark on the left, light on the right, as scanners and microscopes write them."""
    ramp = np.tile(np.linspace(0, 65535, size), (size, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    return path


def test_a_16_bit_grayscale_png_keeps_its_shades_in_training_and_in_scoring(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    gray16(folder / "scan.png")
    assert Image.open(folder / "scan.png").mode == "I;16"
    trained_on = np.asarray(load_reference_images(folder, 16)[0])
    scored = np.asarray(read_images([folder / "scan.png"])[0])
    for pixels in (trained_on, scored):
        assert pixels[:, 0].mean() < 20 and pixels[:, -1].mean() > 235  # Pillow alone gives solid white
        assert 100 < pixels.mean() < 155


def test_eight_bit_images_and_transparency_are_unchanged_by_the_16_bit_path():
    from tokenbooth.images import to_rgb

    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    assert to_rgb(rgb).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)


def test_images_are_listed_by_suffix_in_file_name_order(tmp_path):
    from tokenbooth.images import list_images

    for name in ("b.PNG", "a.jpg", "notes.txt", "c.webp"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp"]
    with pytest.raises(UserError, match="no images in"):
        list_images(tmp_path / "d.png")


def test_atomically_written_files_follow_the_umask_like_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "shared.json", {"a": 1})
        atomic_save_image(Image.new("RGB", (2, 2)), tmp_path / "shared.png")
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE((tmp_path / name).stat().st_mode)  # noqa: E731
    assert mode("shared.json") == 0o644 and mode("shared.png") == 0o644  # mkstemp alone gives 0600
    assert mode("private.json") == 0o600


@pytest.mark.parametrize("content,message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "must hold a JSON object, not a list"),
])
def test_a_json_file_that_is_not_a_utf8_json_object_is_one_clear_error(tmp_path, content, message):
    from tokenbooth.io import read_json_object

    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_json_object(tmp_path / "x.json", "config")
    (tmp_path / "ok.json").write_text(json.dumps({"a": 1}))
    assert read_json_object(tmp_path / "ok.json", "config") == {"a": 1}
