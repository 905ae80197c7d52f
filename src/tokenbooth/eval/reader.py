"""The attribute reader: a small classifier that reads every attribute of a toyworld scene from pixels.

toyCLIP learned what captions say; captions never name proportions or parts, so toyCLIP cannot see them.
The reader is trained on renders of pretraining scenes, with the renderer's own attributes as labels (a
reserved subject is never among them), and reads:
  identity  class, body color, accent color, pattern, proportion, parts: what makes one subject itself
  context   background, position, size, accessory: what a prompt asks for
toy-bench scores identity (share of identity attributes read as the subject's) and prompt following (share
of the asked-for context read back) with it. Trained by `python -m tokenbooth.pretrain.reader`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .. import assets
from ..errors import UserError
from ..io import atomic_path
from ..toyworld.world import ACCESSORIES, BACKGROUNDS, CLASSES, COLORS, PATTERNS, POSITIONS, SIZES, Scene

IDENTITY = ("cls", "color", "accent", "pattern", "proportion", "variant")
CONTEXT = ("background", "position", "size", "accessory")
NO_ACCESSORY = "none"
# attribute -> its values, in the order of the reader's outputs
VALUES: dict[str, tuple] = {
    "cls": CLASSES, "color": tuple(COLORS), "accent": tuple(COLORS), "pattern": PATTERNS,
    "proportion": (0, 1, 2), "variant": (0, 1, 2),
    "background": BACKGROUNDS, "position": POSITIONS, "size": SIZES, "accessory": (NO_ACCESSORY, *ACCESSORIES),
}
RESOLUTION = 64


def scene_attributes(scene: Scene) -> dict:
    """The answer key: what the reader should read from a render of this scene."""
    inst = scene.instance
    return {"cls": inst.cls, "color": inst.color, "accent": inst.accent, "pattern": inst.pattern,
            "proportion": inst.proportion, "variant": inst.variant, "background": scene.background,
            "position": scene.position, "size": scene.size, "accessory": scene.accessory or NO_ACCESSORY}


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Per attribute, the index of each scene's value."""
    keys = [scene_attributes(s) for s in scenes]
    return {a: torch.tensor([VALUES[a].index(k[a]) for k in keys]) for a in VALUES}


@dataclass
class ReaderConfig:
    width: int = 32
    resolution: int = RESOLUTION


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeReader(nn.Module):
    """A plain CNN (64 px -> 4x4 features, flattened so that where things are survives) with one linear
    head per attribute."""

    def __init__(self, cfg: ReaderConfig = ReaderConfig()):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.features = nn.Sequential(
            _block(3, w, 2), _block(w, w, 1),  # 32 px
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),  # 16
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),  # 8
            _block(4 * w, 4 * w, 2),  # 4
            nn.Flatten(), nn.Linear(4 * w * (cfg.resolution // 16) ** 2, 512), nn.ReLU(inplace=True),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(512, len(v)) for a, v in VALUES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels: (B, 3, H, W) in [-1, 1] -> attribute -> logits (B, n values)."""
        h = self.features(pixels)
        return {a: head(h) for a, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images) -> list[dict]:
        """PIL images (any size; resized to the reader's) -> one {attribute: value} per image."""
        self.eval()
        out = []
        for start in range(0, len(images), 256):
            logits = self(to_pixels(images[start : start + 256], self.cfg.resolution))
            best = {a: l.argmax(1).tolist() for a, l in logits.items()}
            out += [{a: VALUES[a][best[a][i]] for a in VALUES} for i in range(len(best["cls"]))]
        return out


def to_pixels(images, resolution: int = RESOLUTION) -> torch.Tensor:
    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.BOX)
                         if im.size != (resolution, resolution) else im.convert("RGB")) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_reader(model: AttributeReader, folder: Path, report: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "reader.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    config = {"width": model.cfg.width, "resolution": model.cfg.resolution, "values": VALUES}
    with atomic_path(folder / "reader.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    if report is not None:
        with atomic_path(folder / "accuracy.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")


def load_reader(folder: Path | None = None) -> AttributeReader:
    folder = Path(folder or assets.READER_DIR)
    if not (folder / "reader.safetensors").exists():
        raise UserError(f"no attribute reader in {folder} (make one with: python -m tokenbooth.pretrain.reader)")
    config = json.loads((folder / "reader.json").read_text())
    if {a: list(v) for a, v in VALUES.items()} != config["values"]:
        raise UserError(f"the attribute reader in {folder} reads another toyworld's attributes: retrain it")
    model = AttributeReader(ReaderConfig(width=config["width"], resolution=config["resolution"]))
    model.load_state_dict(load_file(str(folder / "reader.safetensors")), strict=True)
    return model.eval()


def accuracy(model: AttributeReader, images, scenes: list[Scene]) -> dict[str, float]:
    """Per attribute, the share of images read right."""
    readings = model.read(images)
    truth = [scene_attributes(s) for s in scenes]
    return {a: float(np.mean([r[a] == t[a] for r, t in zip(readings, truth)])) for a in VALUES}
