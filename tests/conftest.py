"""Shared fixtures: a tiny random-weight Chameleon backbone saved in the real on-disk format, so tests go
through the same loading and sampling code as mini and Lumina-mGPT, in seconds."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_flush_denormal(True)
torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves


def build_tiny_model_folder(folder, seed: int = 0):
    from transformers import ChameleonForConditionalGeneration

    from tokenbooth.backbones.chameleon import ChameleonBackbone, ChameleonSpec, save_chameleon
    from tokenbooth.toyworld import caption, pretraining_scene
    from tokenbooth.vq import VQGAN, VQGANConfig
    from tokenbooth.backbones.chameleon_build import chameleon_config, train_bpe_tokenizer

    torch.manual_seed(seed)
    vq_cfg = VQGANConfig(embed_dim=16, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    rng = random.Random(seed)
    tokenizer = train_bpe_tokenizer([caption(pretraining_scene(i), rng) for i in range(300)], vq_cfg.n_embed, 40)
    config = chameleon_config(tokenizer.get_vocab(), n_codes=vq_cfg.n_embed, hidden=64, layers=2, heads=4, context=160)
    backbone = ChameleonBackbone("tiny", ChameleonForConditionalGeneration(config).eval(), tokenizer,
                                 VQGAN(vq_cfg).eval(), ChameleonSpec(resolution=16, size_unit=4, family="mini"))
    save_chameleon(backbone, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model_folder(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from tokenbooth.backbones import load_backbone

    return load_backbone(str(tiny_model_dir))


def run_cli(capsys, *argv):
    """Runs `tokenbooth ARGV` in-process: (exit code, stdout, stderr)."""
    from tokenbooth.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
