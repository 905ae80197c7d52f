"""Stage 2 over two processes (gloo on the CPU), launched by `accelerate launch` with the shipped config:
the sharded run reaches the single-process adapter, and an interrupted sharded run resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subject_images
from safetensors.torch import load_file

from tokenbooth.assets import ACCELERATE_FSDP
from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import TrainConfig, load_reference_images, train

RUN = """
import json, sys
from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import TrainConfig, load_reference_images, train
from tokenbooth.personalize.sharded import Sharding
model, refs, out, settings, stop, resume = sys.argv[1:7]
backbone = load_backbone(model)
train(backbone, load_reference_images(refs, 16), TrainConfig(**json.loads(settings)), out, resume=resume == "1",
      progress=False, stop_after=int(stop) or None, sharding=Sharding.from_environment())
"""
SETTINGS = dict(class_name="robot", stage1_steps=2, stage2_steps=3, stage1_lr=1e-2, stage2_lr=1e-3, batch_size=4,
                checkpointing_steps=100)


def launch(tmp_path, model, refs, out, stop=0, resume=False):
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_FSDP),
                           "--num_processes", "2", str(script), str(model), str(refs), str(out), json.dumps(SETTINGS),
                           str(stop), "1" if resume else "0"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def adapter(folder):
    return {**load_file(str(folder / "learned_embeds.safetensors")), **load_file(str(folder / "layers.safetensors"))}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    refs = subject_images(tmp / "refs")
    single = train(load_backbone(str(tiny_model_dir)), load_reference_images(refs, 16), TrainConfig(**SETTINGS),
                   tmp / "single", progress=False)
    launch(tmp, tiny_model_dir, refs, tmp / "sharded")
    launch(tmp, tiny_model_dir, refs, tmp / "interrupted", stop=3)  # one step into stage 2
    launch(tmp, tiny_model_dir, refs, tmp / "interrupted", resume=True)
    return single, tmp / "sharded", tmp / "interrupted"


def test_sharded_stage2_reaches_the_single_process_adapter(runs):
    single, sharded, _ = runs
    a, b = adapter(single), adapter(sharded)
    assert set(a) == set(b) and any("q_proj" in k for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    single_log = [json.loads(line)["loss"] for line in (single / "log.jsonl").read_text().splitlines()]
    sharded_log = [json.loads(line)["loss"] for line in (sharded / "log.jsonl").read_text().splitlines()]
    assert sharded_log == pytest.approx(single_log, rel=1e-4)


def test_an_interrupted_sharded_run_resumes_to_the_same_adapter(runs):
    _, sharded, interrupted = runs
    a, b = adapter(sharded), adapter(interrupted)
    assert all(torch.equal(a[k], b[k]) for k in a)
