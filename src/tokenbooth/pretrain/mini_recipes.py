"""What makes each version of mini (its tokenizer, transformer and their training budgets) and the toyworld
scenes it pretrains on: the `data` step of `python -m tokenbooth.pretrain.mini`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..assets import MINI_DIR
from ..backbones.chameleon import ChameleonSpec
from ..io import atomic_path
from ..toyworld import Scene, pretraining_scene, render
from ..vq import VQGANConfig
from .loop import log

RESOLUTION = 64
MODEL_DIR = MINI_DIR  # the shipped model folder `--recipe v2` writes


@dataclass(frozen=True)
class Recipe:
    """Everything that makes one version of mini: its tokenizer, transformer and their training budgets."""

    name: str
    vqgan: VQGANConfig
    size_unit: int  # pixels a size token counts: two VQ latents a side, as in Lumina-mGPT
    context: int  # positions: a prompt of about 40 tokens + the image block (rows of latents and a row end)
    # Cosine cycles with warm restarts (steps, peak learning rate), each with its own warm-up
    transformer_cycles: tuple[tuple[int, float], ...]
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    transformer_batch: int = 48
    num_scenes: int = 60_000
    vqgan_steps: int = 8000  # 0: trained elsewhere, given with --vqgan
    vqgan_batch: int = 8
    vqgan_lr: float = 4e-4
    decoder_steps: int = 1200
    decoder_lr: float = 2e-4
    model_dir: Path | None = None  # where `export` writes; None: <work>/model
    export_dtype: str = "float32"  # the transformer's dtype on disk (loads read mini's weights back as fp32)

    @property
    def transformer_steps(self) -> int:
        return sum(steps for steps, _ in self.transformer_cycles)

    @property
    def spec(self) -> ChameleonSpec:
        return ChameleonSpec(resolution=RESOLUTION, size_unit=self.size_unit, family="mini")


# mini v2, what ships. Its VQGAN: the same class as Chameleon's (ch 128, ch_mult 1,1,2,2,4, 8192 codes), 4x
# down-sampling so that 64 px images become 16 x 16 = 256 tokens. 8x (64 tokens) was tried first from scratch:
# its codes smeared the patterns, accents and parts away (21.5 dB), the identity stage 2 exists to learn.
# Its transformer's cycles: the first 1200-step cycle left the loss still falling (1.80) and prompts
# half-followed; a second, gentler cycle continued from it (a stopped run is extended by resuming, not
# retrained). The second ended at 1.53 with objects still smudged (backgrounds right 96%, colors and positions
# about 71%): a third, gentler still, followed.
V2 = Recipe(
    name="v2",
    vqgan=VQGANConfig(embed_dim=32, n_embed=1024, z_channels=64, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1,
                      resolution=RESOLUTION),
    size_unit=8, context=384, transformer_cycles=((1200, 1e-3), (1800, 5e-4), (1800, 3e-4)), model_dir=MODEL_DIR)
# mini v3 (issue #23): 8x down-sampling, 8 x 8 = 64 tokens a picture and 4096 codes. Its VQGAN is not trained
# here: it is the tokenizer pilot's design D (v2's grown by one level, subject-weighted; mini_v3_pilot.py),
# passed with --vqgan. A 64-token picture makes a sequence of at most about 115 positions instead of 315, so
# at v2's steps and batch a transformer of v2's size costs 0.26x v2's step and one of 384 x 8 layers (3.2x
# v2's parameters) 0.60x (benchmarks/mini_step.py, 2 cores): v3 takes the larger one.
V3 = Recipe(
    name="v3",
    vqgan=VQGANConfig(embed_dim=32, n_embed=4096, z_channels=64, ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=1,
                      resolution=RESOLUTION),
    size_unit=16, context=160, transformer_cycles=((1200, 1e-3), (1800, 5e-4), (1800, 3e-4)), hidden=384,
    layers=8, vqgan_steps=0, decoder_steps=0,
    export_dtype="bfloat16")  # 18.1M parameters: 72 MB in fp32, over the package's budget of about 60 MB
RECIPES = {r.name: r for r in (V2, V3)}
# v2's names, read by the tokenizer pilot and the tests
VQGAN_CONFIG, MINI_SPEC = V2.vqgan, V2.spec
WARMUP = 100


# --- data ---------------------------------------------------------------------------------------------

def build_data(work: Path, recipe: Recipe = V2) -> None:
    if (work / "scenes.jsonl").exists():
        return
    log(f"rendering {recipe.num_scenes} scenes")
    scenes = [pretraining_scene(i) for i in range(recipe.num_scenes)]
    pixels = np.stack([np.asarray(render(s, RESOLUTION)) for s in scenes])
    with atomic_path(work / "pixels.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pixels)
    with atomic_path(work / "scenes.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in scenes))


def load_pixels(work: Path) -> torch.Tensor:
    arr = np.load(work / "pixels.npy")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_scenes(work: Path) -> list[Scene]:
    return [Scene.from_dict(json.loads(line)) for line in (work / "scenes.jsonl").read_text().splitlines()]
