"""Emu3's stage 2 over two processes (gloo on the CPU, `accelerate launch` with the shipped FSDP config) reaches
the single-process adapter: the FSDP code is family-generic (personalize/sharded.py shards the Linear layers
stage 2 trains, whatever model holds them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import EMU3_RES, subject_images, write_emu3_folder
from safetensors.torch import load_file

from tokenbooth.assets import ACCELERATE_FSDP
from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import TrainConfig, load_reference_images, train

RUN = """
import json, sys, torch
from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import TrainConfig, load_reference_images, train
from tokenbooth.personalize.sharded import Sharding
model, refs, out, settings, resolution = sys.argv[1:6]
backbone = load_backbone(model, resolution=int(resolution), dtype=torch.float32)
train(backbone, load_reference_images(refs, int(resolution)), TrainConfig(**json.loads(settings)), out, progress=False,
      sharding=Sharding.from_environment())
"""
SETTINGS = dict(class_name="robot", stage1_steps=1, stage2_steps=2, stage1_lr=1e-2, stage2_lr=1e-3, batch_size=4,
                checkpointing_steps=100)


def adapter(folder):
    return {**load_file(str(folder / "learned_embeds.safetensors")), **load_file(str(folder / "layers.safetensors"))}


def test_sharded_emu3_stage2_reaches_the_single_process_adapter(tmp_path):
    model = write_emu3_folder(tmp_path / "tiny-emu3")
    refs = subject_images(tmp_path / "refs", size=EMU3_RES)
    single = train(load_backbone(str(model), resolution=EMU3_RES, dtype=torch.float32),
                   load_reference_images(refs, EMU3_RES), TrainConfig(**SETTINGS), tmp_path / "single", progress=False)
    script = tmp_path / "run.py"
    script.write_text(RUN)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_FSDP),
                           "--num_processes", "2", str(script), str(model), str(refs), str(tmp_path / "sharded"),
                           json.dumps(SETTINGS), str(EMU3_RES)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = adapter(single), adapter(tmp_path / "sharded")
    assert set(a) == set(b) and any(".text_model.layers.0.self_attn.q_proj" in k for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
