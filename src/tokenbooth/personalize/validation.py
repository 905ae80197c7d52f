"""What a run shows along the way: validation pictures of [V] as it is, their fidelity to the references, and
the loss plot.

Fidelity is scored by whoever starts the run (`train(fidelity_scorer=...)`): the encoders are evaluation's
(eval/fidelity.py builds the family's DINO-role scorer), and training does not import evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ..backbones.families import family_defaults
from ..errors import warn
from ..images import line_plot, make_grid
from ..io import atomic_save_image, read_jsonl
from ..sampling import draw_in_batches
from . import run_folder
from .adapter import PersonalizedBackbone
from .config import TrainConfig, sampling_config
from .loss import autocast_for
from .placeholder import Placeholder

# score(pictures) -> (mean cosine similarity to the references, the encoder's name)
Scorer = Callable[[list], tuple[float, str]]
# fidelity_scorer(backbone, references) -> a Scorer, or None where its encoder is not available
FidelityScorer = Callable[[object, list], "Scorer | None"]


def announce_validation_base(cfg: TrainConfig) -> None:
    """One stderr line where the validation pictures are drawn on a quantized base: the model as it trains
    (QLoRA's LoRA over its 4- or 8-bit layers), as `generate` then draws the adapter by default."""
    if cfg.quantize != "none" and cfg.validation_prompts:
        warn(f"validation pictures are drawn on the base quantized to {cfg.quantize} that the run trains on, as "
             f"generate will draw the adapter unless told --quantize none")


@torch.no_grad()
def render_validation(backbone, placeholder: Placeholder, cfg: TrainConfig, path: Path, write: bool = True) -> list:
    """A small grid of the validation prompts with the current [V], drawn without touching training state
    (in a sharded run every process draws, in step, and the first writes), at most the family's sampling batch
    at a time (`tokenbooth plan` plans that batch in the middle of training)."""
    table = backbone.input_embeddings().weight
    original = table[placeholder.token_ids].clone()
    table[placeholder.token_ids] = placeholder.rows.to(table.dtype)
    training = [m for m in backbone.model.modules() if m.training]  # checkpointed layers would drop the KV cache
    backbone.model.eval()
    try:
        personalized = PersonalizedBackbone(backbone, placeholder.text, placeholder.token)
        batch = family_defaults(backbone.family).sample_batch_size  # memory as generate's default batch
        with autocast_for(backbone)():  # trained layers are fp32 copies inside a bf16 model
            images = [image for drawing in draw_in_batches(personalized, cfg.validation_prompts,
                                                           sampling_config(backbone, cfg), batch)
                      for image in drawing.images]
    finally:
        table[placeholder.token_ids] = original
        for module in training:
            module.train()
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_image(make_grid(images), path)
    return images


def log_fidelity(out: Path, scorer: Scorer | None, pictures: list, step: int, stage: str) -> None:
    """One fidelity.jsonl record; nothing where no scorer (no encoder, or not the writing process)."""
    if scorer is not None:
        value, encoder = scorer(pictures)
        run_folder.append_record(out / run_folder.FIDELITY_LOG, {"step": step, "stage": stage,
                                                                "fidelity": round(value, 4), "encoder": encoder})


def write_loss_plot(out: Path) -> None:
    """loss.png: the loss curve, and under it the fidelity of the validation pictures where they were scored."""
    records = read_jsonl(out / run_folder.LOG)
    if not records:
        return
    plot = line_plot([r["loss"] for r in records], title="training loss (image tokens)")
    points = read_jsonl(out / run_folder.FIDELITY_LOG)
    if points:
        below = line_plot([r["fidelity"] for r in points], x_ends=(f"step {points[0]['step']}", points[-1]["step"]),
                          title=f"fidelity of the validation pictures: {points[0]['encoder']} cosine to the "
                                f"references, every validation step")
        both = Image.new("RGB", (plot.width, plot.height + below.height), "white")
        both.paste(plot, (0, 0))
        both.paste(below, (0, plot.height))
        plot = both
    atomic_save_image(plot, out / run_folder.LOSS_PLOT)
