"""`tokenbooth demo`: personalize mini on the bundled toy robot and show what it learned, in one grid.

Rows: the five reference pictures; the base model asked for the class word alone (what "robot" means
to it before personalization); then the personalized model in new contexts, a property change and an
accessory, DreamBench's three kinds of prompts.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..backbones import load_backbone
from ..errors import UserError
from ..images import labeled_rows
from ..io import atomic_save_image, atomic_write_json, check_can_create
from ..sampling import SamplingConfig, check_sampler, draw
from ..toyworld import demo_subject
from . import run_folder
from .adapter import load_adapter
from .config import TrainConfig
from .data import load_reference_images
from .recipe import train

MODEL = "mini"
IMAGES_PER_ROW = 5
PROMPTS = (
    ("base model: a robot", "a robot", False),
    ("[V] robot on the beach", "a [V] robot on the beach", True),
    ("[V] robot in the snow", "a [V] robot in the snow", True),
    ("[V] robot at night", "a [V] robot under a starry night sky", True),
    ("a red [V] robot", "a red [V] robot on a white background", True),
    ("[V] robot wearing a hat", "a [V] robot wearing a hat on the grass", True),
)


def make_demo(out: Path, seed: int = 0, overwrite: bool = False, **sampling) -> Path:
    """Personalizes mini on the bundled robot into OUT/adapter and draws OUT/demo.png; returns the grid's path.
    sampling: SamplingConfig fields over mini's defaults (backbones/families.py), e.g. sampler="sjd"."""
    out = Path(out)
    adapter_dir, grid_path = out / "adapter", out / "demo.png"
    if (adapter_dir.exists() or grid_path.exists()) and not overwrite:
        raise UserError(f"{out} already holds a demo; pass --overwrite or choose another --out")
    check_can_create(out, "output folder", folder=True)
    t0 = time.time()
    base = load_backbone(MODEL)
    sampling = SamplingConfig.for_family(base.family, **{"seed": seed, **sampling})
    sampling.validate()
    check_sampler(sampling, base.layout.body_length)
    references = load_reference_images(demo_subject.FOLDER, base.resolution)
    cfg = TrainConfig.for_family(base.family, class_name=demo_subject.CLASS_NAME, seed=seed)
    if overwrite:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    print(f"1/2 personalizing mini on {len(references)} pictures of a robot it has never seen "
          f"({cfg.stage1_steps} + {cfg.stage2_steps} steps)")
    train(base, references, cfg, adapter_dir)
    train_seconds = time.time() - t0

    print(f"2/2 drawing the comparison grid (guidance {sampling.cfg_scale}, {sampling.sampler} sampler)")
    untouched = load_backbone(MODEL)
    personalized = load_adapter(load_backbone(MODEL), adapter_dir)
    rows = [("references (never in pretraining)", references)]
    for label, prompt, uses_adapter in PROMPTS:
        model = personalized if uses_adapter else untouched
        rows.append((label, draw(model, [prompt] * IMAGES_PER_ROW, sampling, progress=True).images))
    atomic_save_image(labeled_rows(rows), grid_path)
    atomic_write_json(out / "demo.json", {
        "subject": demo_subject.SUBJECT.key, "prompts": [p for _, p, _ in PROMPTS], "seed": seed,
        "sampling": sampling.to_dict(),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
    })
    print(f"done in {time.time() - t0:.0f}s: grid {grid_path}, adapter {adapter_dir}, "
          f"loss curve {adapter_dir / run_folder.LOSS_PLOT}")
    return grid_path
