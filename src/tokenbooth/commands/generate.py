"""`tokenbooth generate`: prompt in; PNGs, a grid and a JSON sidecar with every setting out.

Sampling settings, each from the first that has it: a flag, the adapter's record of how it was trained and
validated, the model family's defaults. Nothing is created before the images exist.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from .common import DEFAULT_MODEL, add_model_flags, add_sampling_flags, load_model, positive_int, sampling_overrides


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="draw images from a text prompt",
                              description="Draw images from a text prompt, with or without an adapter.")
    p.add_argument("prompt")
    add_model_flags(p)
    p.add_argument("-n", "--num-images", type=positive_int, default=4, help="images to draw in one batch (default: 4)")
    p.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.add_argument("--adapter", type=Path, help="an adapter folder written by `tokenbooth train`; its recorded "
                                                "sampling settings apply unless a flag says otherwise")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    add_sampling_flags(p)
    p.set_defaults(run=run)


def check_output(out: Path, names: list[str], overwrite: bool) -> None:
    """Refuses an output folder that cannot be written or would lose files; creates nothing."""
    from ..io import check_can_create

    check_can_create(out, "output folder", folder=True)
    taken = [n for n in names if (out / n).exists()] if out.is_dir() else []
    if taken and not overwrite:
        raise UserError(f"{out / taken[0]} already exists; pass --overwrite or choose another --out")


def run(args: argparse.Namespace) -> None:
    from .. import __version__
    from ..images import make_grid
    from ..io import atomic_save_image, atomic_write_json
    from ..personalize import load_adapter
    from ..personalize.adapter import warn_if_no_placeholder
    from ..sampling import SamplingConfig, draw

    overrides = sampling_overrides(args)
    names = [f"image-{i:03d}.png" for i in range(args.num_images)]
    check_output(args.out, [*names, "grid.png", "generate.json"], args.overwrite)
    backbone = load_model(args)
    recorded = {}
    if args.adapter is not None:
        backbone = load_adapter(backbone, args.adapter)
        warn_if_no_placeholder(args.prompt, backbone.placeholder)
        recorded = backbone.sampling
    cfg = SamplingConfig.for_family(backbone.family, **{**recorded, "seed": args.seed, **overrides})
    drawing = draw(backbone, [args.prompt] * args.num_images, cfg, progress=True)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {args.out}: {e.strerror}") from None
    for name, image in zip(names, drawing.images):
        atomic_save_image(image, args.out / name)
    atomic_save_image(make_grid(drawing.images), args.out / "grid.png")
    settings = {k: v for k, v in cfg.to_dict().items() if cfg.sampler == "sjd" or not k.startswith("sjd_")}
    sjd = {"sjd_tokens_per_pass": round(drawing.stats.mean_tokens_per_pass, 3)} if cfg.sampler == "sjd" else {}
    atomic_write_json(args.out / "generate.json", {
        "tokenbooth_version": __version__, "model": args.model or DEFAULT_MODEL, "prompt": args.prompt,
        "adapter": str(args.adapter) if args.adapter else None, "num_images": args.num_images,
        "resolution": backbone.resolution, **settings, "images": names, "seconds": round(drawing.seconds, 2),
        "forward_passes": drawing.stats.forward_passes, **sjd})
    print(f"wrote {args.num_images} images and grid.png to {args.out} ({drawing.seconds:.1f}s)")
