"""Shared fixtures: tiny random-weight models saved in the real on-disk formats, so tests go through the same
loading and sampling code as mini, Lumina-mGPT and Janus-Pro, in seconds. Plain functions the tests share are
in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model_folder, subject_images, write_janus_folder

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from tokenbooth.backbones import load_backbone

    return load_backbone(str(tiny_model_dir))


@pytest.fixture(scope="session")
def janus_dir(tmp_path_factory):
    """A tiny Janus-Pro folder as the Hub's are: bf16 weights."""
    return write_janus_folder(tmp_path_factory.mktemp("published") / "tiny-janus")


@pytest.fixture(scope="session")
def janus_fp32_dir(tmp_path_factory):
    """The same tiny Janus-Pro in fp32, for tests that compare numbers exactly (bf16 rounds them apart)."""
    return write_janus_folder(tmp_path_factory.mktemp("janus-fp32") / "tiny-janus", dtype=torch.float32)


@pytest.fixture
def refs(tmp_path):
    """The reference pictures of helpers.subject_images, loaded at the tiny model's 16 px."""
    from tokenbooth.personalize import load_reference_images  # the recipe's layer: see helpers.py's docstring

    return load_reference_images(subject_images(tmp_path / "refs"), 16)
