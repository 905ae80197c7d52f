"""`tokenbooth generate`: prompt in, PNGs + grid + a JSON sidecar with every setting out."""

from __future__ import annotations

import time
from pathlib import Path

from . import __version__
from .errors import UserError
from .images import make_grid
from .io import atomic_save_image, atomic_write_json
from .sampling import SamplingConfig, SamplingStats, check_sampler, draw_codes
from .sampling.sjd import SJDStats


def prepare_output_dir(out: Path, names: list[str], overwrite: bool) -> None:
    """Creates `out`; refuses to replace files already there unless asked to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    if not out.is_dir():
        raise UserError(f"output path {out} is not a folder")
    taken = [n for n in names if (out / n).exists()]
    if taken and not overwrite:
        raise UserError(f"{out / taken[0]} already exists; pass --overwrite or choose another --out")
    probe = out / ".tokenbooth-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror}") from None


def sampling_config(args) -> SamplingConfig:
    cfg = SamplingConfig(cfg_scale=args.cfg, image_top_k=args.top_k, top_p=args.top_p,
                         temperature=args.temperature, seed=args.seed, kv_cache=not args.no_kv_cache,
                         sampler=args.sampler, **sjd_options(args))
    cfg.validate()
    check_sampler(cfg)
    return cfg


def sjd_options(args) -> dict:
    """The SJD flags given, as SamplingConfig fields; SJD flags without --sampler sjd are a mistake."""
    given = {field: value for field, value in (("sjd_window", args.sjd_window), ("sjd_init", args.sjd_init),
                                               ("sjd_coupling", args.sjd_coupling)) if value is not None}
    if given and args.sampler != "sjd":
        raise UserError(f"--{next(iter(given)).replace('_', '-')} only applies to --sampler sjd")
    return given


def run_generate(args) -> None:
    from .backbones import load_backbone_from_args
    from .vq import tensor_to_pil

    if args.num_images < 1:
        raise UserError(f"-n must be >= 1 (got {args.num_images})")
    cfg = sampling_config(args)
    names = [f"image-{i:03d}.png" for i in range(args.num_images)] + ["grid.png", "generate.json"]
    prepare_output_dir(args.out, names, args.overwrite)
    backbone = load_backbone_from_args(args)
    if args.adapter is not None:
        from .personalize import load_adapter
        from .personalize.adapter import warn_if_no_placeholder

        backbone = load_adapter(backbone, args.adapter)
        warn_if_no_placeholder(args.prompt, backbone.placeholder)
    prompts, t0 = [args.prompt] * args.num_images, time.time()
    stats = SJDStats() if cfg.sampler == "sjd" else SamplingStats()
    codes = draw_codes(backbone, prompts, cfg, progress=True, stats=stats)
    images = tensor_to_pil(backbone.decode_images(codes))
    seconds = time.time() - t0
    for name, image in zip(names, images):
        atomic_save_image(image, args.out / name)
    atomic_save_image(make_grid(images), args.out / "grid.png")
    atomic_write_json(args.out / "generate.json", {
        "tokenbooth_version": __version__, "model": args.model, "prompt": args.prompt,
        "adapter": str(args.adapter) if args.adapter else None,
        "num_images": args.num_images, "resolution": backbone.resolution, **cfg.to_dict(),
        "images": names[: args.num_images], "seconds": round(seconds, 2), "forward_passes": stats.forward_passes,
        **({"sjd_tokens_per_pass": round(stats.mean_tokens_per_pass, 3)} if cfg.sampler == "sjd" else {}),
    })
    print(f"wrote {args.num_images} images and grid.png to {args.out} ({seconds:.1f}s)")
