"""`tokenbooth demo`: personalize mini on the bundled toy robot and show what it learned, in one grid.

Rows: the five reference pictures; the base model asked for the class word alone (what "robot" means
to it before personalization); then the personalized model in new contexts, a property change and an
accessory, DreamBench's three kinds of prompts.

After the grid is drawn, a judge (passed in: `tokenbooth demo` passes the attribute reader's, eval/demo_figures.py)
reads every cell; its figures go into OUT/demo.json beside the grid.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from ..backbones import load_backbone
from ..errors import UserError
from ..images import labeled_rows
from ..io import atomic_save_image, atomic_write_json, check_can_create
from ..sampling import SamplingConfig, check_sampler, draw
from ..toyworld import demo_subject
from . import run_folder
from .adapter import load_for_sampling
from .config import TrainConfig
from .data import load_reference_images
from .recipe import train

MODEL = "mini"
IMAGES_PER_ROW = 5
REFERENCES_LABEL = "references (never in pretraining)"


class DemoPrompt(NamedTuple):
    label: str
    text: str
    personalized: bool  # drawn by the personalized model (else by the base model)
    asks: dict | None  # what the prompt asks for, as toyworld names it (the judge reads it back)


PROMPTS = (
    DemoPrompt("base model: a robot", "a robot", False, None),
    DemoPrompt("[V] robot on the beach", "a [V] robot on the beach", True, {"background": "beach"}),
    DemoPrompt("[V] robot in the snow", "a [V] robot in the snow", True, {"background": "snow"}),
    DemoPrompt("[V] robot at night", "a [V] robot under a starry night sky", True, {"background": "night"}),
    DemoPrompt("a red [V] robot", "a red [V] robot on a white background", True,
               {"background": "white", "color": "red"}),
    DemoPrompt("[V] robot wearing a hat", "a [V] robot wearing a hat on the grass", True,
               {"background": "grass", "accessory": "hat"}),
)

# A judge reads the drawn rows, each {"label", "kind" ("references", "base" or "personalized"), "asks",
# "images"}, and returns JSON-ready figures for demo.json.
Judge = Callable[[list[dict]], dict]


def make_demo(out: Path, seed: int = 0, overwrite: bool = False, judge: Judge | None = None, model: str | None = None,
              quantize: str = "none", **sampling) -> Path:
    """Personalizes mini on the bundled robot into OUT/adapter, draws OUT/demo.png and writes OUT/demo.json (the
    settings, and the judge's figures when a judge is given); returns the grid's path.
    model: a folder of another mini (a candidate being judged before it ships); default: the bundled one.
    quantize: "int8" or "nf4" for the whole demo on a quantized base (stage 2 then trains LoRA over it, QLoRA,
    and every row is drawn on it, as `generate --quantize` draws).
    sampling: SamplingConfig fields over mini's defaults (backbones/families.py), e.g. sampler="sjd"."""
    out = Path(out)
    adapter_dir, grid_path = out / "adapter", out / "demo.png"
    if (adapter_dir.exists() or grid_path.exists()) and not overwrite:
        raise UserError(f"{out} already holds a demo; pass --overwrite or choose another --out")
    check_can_create(out, "output folder", folder=True)
    t0 = time.time()
    model = model or MODEL
    base = load_backbone(model)
    sampling = SamplingConfig.for_family(base.family, **{"seed": seed, **sampling})
    sampling.validate()
    check_sampler(sampling, base.layout.body_length)
    references = load_reference_images(demo_subject.FOLDER, base.resolution)
    lean = {"layers": "lora", "quantize": quantize} if quantize != "none" else {}  # Q/K/V cannot train on it
    cfg = TrainConfig.for_family(base.family, class_name=demo_subject.CLASS_NAME, seed=seed, **lean)
    if overwrite:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    print(f"1/2 personalizing mini on {len(references)} pictures of a robot it has never seen "
          f"({cfg.stage1_steps} + {cfg.stage2_steps} steps)")
    train(base, references, cfg, adapter_dir)
    train_seconds = time.time() - t0

    print(f"2/2 drawing the comparison grid (guidance {sampling.cfg_scale}, {sampling.sampler} sampler)")
    untouched, _ = load_for_sampling(model, None, quantize)
    personalized, _ = load_for_sampling(model, adapter_dir, quantize)
    rows = [(REFERENCES_LABEL, references)]
    for prompt in PROMPTS:
        drawer = personalized if prompt.personalized else untouched
        rows.append((prompt.label, draw(drawer, [prompt.text] * IMAGES_PER_ROW, sampling, progress=True).images))
    atomic_save_image(labeled_rows(rows), grid_path)
    # judged after the grid is saved: reading the cells changes no pixel of it
    figures = judge(judged_rows(rows)) if judge is not None else None
    atomic_write_json(out / "demo.json", {
        "subject": demo_subject.SUBJECT.key, "model": str(model), "prompts": [p.text for p in PROMPTS], "seed": seed,
        "sampling": sampling.to_dict(), "quantize": quantize, "training": asdict(cfg),
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t0, 1),
        **({"reader": figures} if figures is not None else {}),
    })
    print(f"done in {time.time() - t0:.0f}s: grid {grid_path}, adapter {adapter_dir}, "
          f"loss curve {adapter_dir / run_folder.LOSS_PLOT}")
    return grid_path


def judged_rows(rows: list[tuple[str, list]]) -> list[dict]:
    """The grid's rows (references first, then PROMPTS' rows) as a judge reads them."""
    (label, references), drawn = rows[0], rows[1:]
    out = [{"label": label, "kind": "references", "asks": None, "images": references}]
    return out + [{"label": prompt.label, "kind": "personalized" if prompt.personalized else "base",
                   "asks": prompt.asks, "images": images} for prompt, (_, images) in zip(PROMPTS, drawn)]
