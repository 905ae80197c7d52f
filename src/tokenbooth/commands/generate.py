"""`tokenbooth generate`: prompt in; PNGs, a grid and a JSON sidecar with every setting out.

Sampling settings, each from the first that has it: a flag, the adapter's record of how it was trained and
validated, the model family's defaults. Nothing is created before the first batch of images exists; from then on
each batch's images and the sidecar listing them are written as the batch finishes, so an interrupted run keeps
the batches it finished and its sidecar lists exactly the images on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .. import __version__
from ..backbones.families import DEFAULT_MODEL, FAMILIES, family_defaults
from ..backbones.quantize import QUANTIZE
from ..errors import UserError
from ..eval.score import SIDECAR
from ..images import make_grid
from ..io import atomic_save_image, atomic_write_json, check_can_create
from ..personalize import load_adapter
from ..personalize.adapter import sampling_quantization, warn_if_no_placeholder
from ..quiet import require_optional
from ..sampling import SamplingConfig, draw_in_batches
from ..sampling.sampler import SamplingStats
from ..sampling.sjd import SJDStats
from .common import add_model_flags, add_sampling_flags, load_model, positive_int, sampling_overrides

# More images than anyone looks at in one folder, and few enough that a typo (-n 100000000) is refused in one
# line instead of starting a run of days; a longer series is several runs with their own --seed.
MAX_IMAGES = 10_000
GRID = "grid.png"
GRID_IMAGES = 64  # the grid shows the first 64 images (8 x 8): a grid of thousands is too large to look at


def image_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_IMAGES:
        raise argparse.ArgumentTypeError(f"at most {MAX_IMAGES} images per run (got {value})")
    return value


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="draw images from a text prompt",
                              description="Draw images from a text prompt, with or without an adapter.")
    p.add_argument("prompt")
    add_model_flags(p)
    p.add_argument("-n", "--num-images", type=image_count, default=4,
                   help=f"images to draw, at most {MAX_IMAGES} (default: 4)")
    batches = ", ".join(f"{name} {d.sample_batch_size}" for name, d in FAMILIES.items())
    p.add_argument("--batch-size", type=positive_int,
                   help=f"images drawn at once: memory grows with it, not with -n (default: the model family's: "
                        f"{batches}; at most -n)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.add_argument("--adapter", type=Path, help="an adapter folder written by `tokenbooth train`; its recorded "
                                                "sampling settings apply unless a flag says otherwise")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--quantize", choices=QUANTIZE,
                   help="the frozen base's decoder layers in 8 (int8) or 4 (nf4) bits, as `train --quantize` "
                        "stores them: less memory, images close to the full-precision base's (needs torchao; "
                        "default: the --adapter's training base where it only learned [V], else none)")
    add_sampling_flags(p)
    p.set_defaults(run=run)


def base_quantization(quantize: str | None, adapter: Path | None) -> str:
    """--quantize, checked against the adapter; without it, the adapter's training base ("says so"): the
    library decides (personalize/adapter.py: `sampling_quantization`), for every command that samples."""
    return sampling_quantization(quantize, adapter)


def check_output(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuses an output folder that cannot be written or would lose files; creates nothing."""
    check_can_create(out, "output folder", folder=True)
    taken = [n for n in names if (out / n).exists()] if out.is_dir() else []
    if taken and not overwrite:
        raise UserError(f"{out / taken[0]} already exists; pass --overwrite or choose another --out")


def run(args: argparse.Namespace) -> None:
    overrides = sampling_overrides(args)
    width = max(3, len(str(args.num_images - 1)))  # image-000.png ...; names sort in drawing order up to -n 10000
    names = [f"image-{i:0{width}d}.png" for i in range(args.num_images)]
    check_output(args.out, [*names, GRID, SIDECAR], args.overwrite)  # the whole run's names, before the first batch
    quantize = base_quantization(args.quantize, args.adapter)
    if quantize != "none":
        require_optional("torchao", f"--quantize {quantize}")  # before minutes of loading, not after
    backbone = load_model(args, quantize=quantize)
    recorded = {}
    if args.adapter is not None:
        backbone = load_adapter(backbone, args.adapter)
        warn_if_no_placeholder(args.prompt, backbone.placeholder)
        recorded = backbone.sampling
    cfg = SamplingConfig.for_family(backbone.family, **{**recorded, "seed": args.seed, **overrides})
    # A batch larger than -n is drawn as -n, silently: the batch size is a ceiling on memory, not an amount of
    # work, so (as PyTorch's DataLoader with a short last batch, or `xargs -n`) a fixed --batch-size in a script
    # stays valid for any -n, and the family's default needs no special case for -n 1.
    batch_size = min(args.batch_size or family_defaults(backbone.family).sample_batch_size, args.num_images)
    settings = {k: v for k, v in cfg.to_dict().items() if cfg.sampler == "sjd" or not k.startswith("sjd_")}
    meta = {"tokenbooth_version": __version__, "model": args.model or DEFAULT_MODEL, "prompt": args.prompt,
            "adapter": str(args.adapter) if args.adapter else None, "num_images": args.num_images,
            "batch_size": batch_size, "quantize": quantize, "resolution": backbone.resolution, **settings}
    output = Output(args.out, names, meta, SJDStats() if cfg.sampler == "sjd" else SamplingStats())
    for drawing in draw_in_batches(backbone, [args.prompt] * args.num_images, cfg, batch_size, progress=True):
        output.add(drawing)
        del drawing  # else the loop variable keeps this batch's images alive while the next batch is drawn
    print(f"wrote {args.num_images} images and {GRID} to {args.out} ({output.seconds:.1f}s)")


class Output:
    """The output folder of one run, written batch by batch: the batch's images, then the grid (while it still
    grows), then the sidecar listing every image written so far. Holds no image between batches."""

    def __init__(self, out: Path, names: list[str], meta: dict, stats: SamplingStats):
        self.out, self.names, self.meta, self.stats = out, names, meta, stats
        self.written: list[str] = []
        self.seconds = 0.0

    def add(self, drawing) -> None:
        if not self.written:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create output folder {self.out}: {e.strerror}") from None
        start = len(self.written)
        batch = self.names[start:start + len(drawing.images)]
        self.stats.add(drawing.stats)
        self.seconds += drawing.seconds
        try:
            for name, image in zip(batch, drawing.images):
                atomic_save_image(image, self.out / name)
            if start < GRID_IMAGES:
                self.write_grid(self.names[:min(start + len(batch), GRID_IMAGES)])
            atomic_write_json(self.out / SIDECAR, self.sidecar([*self.written, *batch]))
        except BaseException:
            # Interrupted (Ctrl-C, a full disk) before the sidecar lists this batch: its images go too, so the
            # sidecar, which `tokenbooth score` reads, lists exactly the images on disk.
            for name in batch:
                (self.out / name).unlink(missing_ok=True)
            raise
        self.written += batch

    def write_grid(self, names: list[str]) -> None:
        """Read back from disk (PNG is lossless), so no image is kept in memory for the grid between batches."""
        images = []
        for name in names:
            with Image.open(self.out / name) as image:
                images.append(image.convert("RGB"))
        atomic_save_image(make_grid(images), self.out / GRID)

    def sidecar(self, images: list[str]) -> dict:
        sjd = {}
        if isinstance(self.stats, SJDStats):
            sjd["sjd_tokens_per_pass"] = round(self.stats.mean_tokens_per_pass, 3)
        return {**self.meta, "images": images, "seconds": round(self.seconds, 2),
                "forward_passes": self.stats.forward_passes, **sjd}
