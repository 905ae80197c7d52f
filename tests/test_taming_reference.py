"""Meta's VQGAN read by tokenbooth gives the numbers the reference implementation gives.

tests/data/taming_golden/ holds a small checkpoint in Meta's format and the codes and pixels that
CompVis/taming-transformers' own VQModel computed from it (see its README.md): golden values made outside
this project, so a wrong padding, normalisation or layer order in tokenbooth's VQGAN shows here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenbooth.vq import load_vqgan, pil_to_tensor
from tokenbooth.vq.taming import convert_vqgan, load_taming_vqgan

GOLDEN = Path(__file__).parent / "data" / "taming_golden"


@pytest.fixture(scope="module")
def golden():
    return load_file(str(GOLDEN / "golden.safetensors"))


@pytest.fixture(scope="module")
def pictures():
    return pil_to_tensor([Image.open(GOLDEN / f"input-{i}.png").convert("RGB") for i in range(2)])


@pytest.fixture(scope="module", params=["read as released", "converted once"])
def vqgan(request, tmp_path_factory):
    if request.param == "read as released":
        return load_taming_vqgan(GOLDEN / "vqgan.yaml", GOLDEN / "vqgan.ckpt")
    out = tmp_path_factory.mktemp("converted")
    convert_vqgan(GOLDEN / "vqgan.yaml", GOLDEN / "vqgan.ckpt", out)
    return load_vqgan(out)


def test_encoding_gives_the_reference_codes(vqgan, golden, pictures):
    assert torch.equal(vqgan.encode(pictures), golden["codes"])


def test_decoding_gives_the_reference_pixels(vqgan, golden):
    decoded = vqgan.decode(golden["codes"])
    expected = golden["decoded"].clamp(-1, 1)  # tokenbooth's decode clamps to the pixel range, taming's does not
    assert (golden["decoded"].abs() < 1).float().mean() > 0.9  # the comparison is not between clamped values
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-4)
