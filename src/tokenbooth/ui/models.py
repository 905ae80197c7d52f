"""Backbones for the Generate tab: which ones are on disk, a small cache of loaded ones, and drawing through
the library's one sampling entry point (`sampling.draw`) into PNGs that carry their settings."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..backbones import BUILTIN, chameleon, emu3, janus, presets
from ..backbones.hub import cached_file
from ..errors import UserError
from ..io import atomic_path
from ..personalize.adapter import CONFIG as ADAPTER_CONFIG
from ..personalize.adapter import load_for_sampling, sampling_quantization
from ..sampling import SamplingConfig, draw
from .workspace import Subject, Workspace, sanitize_name

PNG_KEY = "tokenbooth"  # the PNG text chunk holding an image's settings as JSON
CACHE_SIZE = 2  # a base model and one personalized copy: enough for "base vs personalized"
FALLBACK_FAMILY = "lumina-mgpt"  # the defaults for a folder that does not say its family: the paper's


def available_models(default: str) -> list[str]:
    """mini always, the published checkpoints whose files are in the local Hugging Face cache, and the
    --model the app was started with."""
    names = list(BUILTIN)
    names += [name for name, (repo, _) in presets().items() if cached_file(repo, "config.json") is not None]
    return names + ([default] if default not in names else [])


def family_of(model: str) -> str | None:
    """The family of a model name without loading it: the published names' tables, or a folder's
    tokenbooth.json (mini's). None when only loading would tell."""
    if model in janus.PRESETS:
        return "janus-pro"
    if model in chameleon.PRESETS:
        return "lumina-mgpt"
    if model in emu3.PRESETS:
        return emu3.FAMILY
    folder = Path(BUILTIN.get(model, model))
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type in ("janus", "emu3"):
            return {"janus": "janus-pro", "emu3": emu3.FAMILY}[model_type]
        return json.loads((folder / "tokenbooth.json").read_text()).get("family")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def defaults_family(model: str) -> str:
    """The family whose defaults the forms start from: the model's own, else FALLBACK_FAMILY."""
    return family_of(model) or FALLBACK_FAMILY


def sampling_defaults(model: str, subject: Subject | None = None) -> SamplingConfig:
    """What the Generate form starts from: the family's defaults, then the adapter's recorded settings."""
    known = {f.name for f in fields(SamplingConfig)}
    recorded = subject.adapter_config().get("sampling", {}) if subject is not None else {}
    overrides = {k: v for k, v in recorded.items() if k in known}
    return SamplingConfig.for_family(defaults_family(model), **overrides)


class Models:
    """Loaded backbones by (model, adapter), least recently used dropped first. One lock: one drawing at a
    time, as the model's weights are shared."""

    def __init__(self):
        self._cache: OrderedDict = OrderedDict()
        self.lock = threading.RLock()

    def get(self, model: str, adapter: Path | None = None, quantize: str | None = "none"):
        """The model with the adapter on it, its base in `quantize`'s bits (None: as the adapter trained;
        personalize/adapter.py's `sampling_quantization` decides, as for `generate --quantize`)."""
        bits = sampling_quantization(quantize, adapter)  # an adapter that cannot go on them: refused, nothing loaded
        key = (model, str(adapter), _mtime(adapter), bits)
        with self.lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            while len(self._cache) >= CACHE_SIZE:
                self._cache.popitem(last=False)
            # load_adapter changes the weights in place: this copy is the subject's
            backbone, _ = load_for_sampling(model, adapter, bits)
            self._cache[key] = backbone
            return backbone

    def clear(self) -> None:
        with self.lock:
            self._cache.clear()


def _mtime(adapter: Path | None) -> float | None:
    return None if adapter is None else (Path(adapter) / ADAPTER_CONFIG).stat().st_mtime


def generate(models: Models, workspace: Workspace, model: str, subject: Subject | None, prompt: str, n: int,
             overrides: dict, quantize: str | None = "none") -> tuple[list[Path], dict]:
    """Draws `n` images of `prompt` (with the subject's adapter when given; the base in `quantize`'s bits, None:
    as the adapter trained) and saves each as a PNG with its settings in a text chunk. Returns the files and
    the settings."""
    if not prompt.strip():
        raise UserError("write a prompt first")
    if not 1 <= n <= 16:
        raise UserError(f"number of images must be 1-16 (got {n})")
    with models.lock:
        adapter = subject.folder if subject is not None else None
        bits = sampling_quantization(quantize, adapter)
        backbone = models.get(model, adapter, bits)
        cfg = SamplingConfig.for_family(backbone.family, **overrides)
        drawing = draw(backbone, [prompt] * n, cfg)
    settings = {"tokenbooth_version": __version__, "model": model, "subject": subject.name if subject else None,
                "prompt": prompt, "num_images": n, "quantize": bits, **cfg.to_dict(),
                "seconds": round(drawing.seconds, 2),
                "forward_passes": drawing.stats.forward_passes}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = subject.name if subject else _base_label(model)
    paths = []
    for i, image in enumerate(drawing.images):
        path = workspace.generations_dir / f"{stamp}-{label}-s{cfg.seed}-{i}.png"
        save_png_with_settings(image, path, {**settings, "index": i})
        paths.append(path)
    return paths, settings


def _base_label(model: str) -> str:
    """"base-NAME" for a base model's files; a model given as a folder path is named by its last part."""
    try:
        return sanitize_name(f"base-{Path(model).name}")
    except UserError:
        return "base"


def save_png_with_settings(image, path: Path, settings: dict) -> None:
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(settings))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def read_png_settings(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text[PNG_KEY])
