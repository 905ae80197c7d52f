"""Speculative Jacobi decoding against plain sampling, side by side in one run.

    python benchmarks/sjd.py                      # mini, 8 images, windows 4 8 16 32, both inits
    python benchmarks/sjd.py --model PATH --images 2

Every image is drawn alone (batch of one: SJD is about latency), with the KV cache and batched CFG on for
both samplers and the same prompt and seed. Per setting: forward passes per image, image tokens fixed per
pass (mean and histogram), seconds per image, and against plain sampling the step compression (plain passes
/ SJD passes) and the latency speedup (plain seconds / SJD seconds). Writes results/sjd.json and
results/sjd.png; the top-level step_compression and latency_speedup are the paper's setting (L = 16,
random init), the best setting is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from tokenbooth.backbones import load_backbone
from tokenbooth.errors import UserError
from tokenbooth.io import atomic_save_image, atomic_write_json
from tokenbooth.sampling import SamplingConfig, SamplingStats, draw_codes
from tokenbooth.sampling.sjd import DEFAULT_WINDOW, INITS, SJDStats
from tokenbooth.toyworld import caption, pretraining_scene

RESULTS = Path(__file__).resolve().parent / "results"
FIRST_UNSEEN_SCENE = 1_000_000  # mini pretrains on scenes 0..59,999: prompts from far beyond


def prompts(n: int) -> list[str]:
    return [caption(pretraining_scene(FIRST_UNSEEN_SCENE + i), random.Random(i)) for i in range(n)]


def timed(backbone, prompt, cfg, stats) -> float:
    t0 = time.perf_counter()
    draw_codes(backbone, [prompt], cfg, stats=stats)
    return time.perf_counter() - t0


def run(args) -> dict:
    backbone = load_backbone(args.model)
    body = backbone.layout.body_length
    windows = [w for w in args.windows if w <= body]
    if len(windows) < len(args.windows):
        print(f"windows above the image body ({body} tokens) skipped", file=sys.stderr)
    texts = prompts(args.images)
    given = {"cfg_scale": args.cfg, "image_top_k": args.top_k}
    base = SamplingConfig.for_family(backbone.family, **{k: v for k, v in given.items() if v is not None})

    def cfg_of(i: int, **sampler) -> SamplingConfig:
        return SamplingConfig(**{**base.to_dict(), "sampler": "plain", "seed": args.seed + i, **sampler})

    draw_codes(backbone, texts[:1], cfg_of(0))  # warm-up: first calls pay for allocations

    plain = SamplingStats()
    plain_seconds = sum(timed(backbone, t, cfg_of(i), plain) for i, t in enumerate(texts))
    plain_row = {"passes_per_image": plain.forward_passes / args.images,
                 "seconds_per_image": plain_seconds / args.images}
    print(f"plain: {plain_row['passes_per_image']:.1f} passes, {plain_row['seconds_per_image']:.3f} s per image",
          flush=True)

    rows = []
    for init in args.inits:
        for window in windows:
            stats = SJDStats()
            sjd = dict(sampler="sjd", sjd_window=window, sjd_init=init)
            seconds = sum(timed(backbone, t, cfg_of(i, **sjd), stats) for i, t in enumerate(texts))
            row = {
                "init": init, "window": window,
                "passes_per_image": stats.forward_passes / args.images,
                "mean_tokens_per_pass": stats.mean_tokens_per_pass,
                "tokens_per_pass_histogram": {str(k): v for k, v in sorted(stats.tokens_per_pass.items())},
                "seconds_per_image": seconds / args.images,
            }
            row["step_compression"] = plain_row["passes_per_image"] / row["passes_per_image"]
            row["latency_speedup"] = plain_row["seconds_per_image"] / row["seconds_per_image"]
            rows.append(row)
            print(f"sjd {init:>6} L={window:<3}: {row['passes_per_image']:.1f} passes, "
                  f"{row['step_compression']:.2f}x steps, {row['latency_speedup']:.2f}x wall-clock", flush=True)

    default = next((r for r in rows if r["init"] == "random" and r["window"] == DEFAULT_WINDOW), rows[0])
    best = max(rows, key=lambda r: r["latency_speedup"])
    return {
        "model": args.model, "images": args.images, "threads": torch.get_num_threads(),
        "image_tokens": backbone.layout.rows * backbone.layout.cols, "body_length": body,
        "sampling": {k: v for k, v in base.to_dict().items() if k not in ("seed", "sampler", "sjd_window", "sjd_init")},
        "first_seed": args.seed,
        "step_compression": default["step_compression"], "latency_speedup": default["latency_speedup"],
        "default_setting": {"init": default["init"], "window": default["window"]},
        "best": {k: best[k] for k in ("init", "window", "step_compression", "latency_speedup")},
        "plain": plain_row, "sjd": rows,
    }


def table(result: dict) -> str:
    head = f"{'sampler':<8}{'init':<8}{'L':>4}{'passes/img':>12}{'tok/pass':>10}{'s/img':>9}{'steps':>8}{'speed':>8}"
    p = result["plain"]
    lines = [head, "-" * len(head),
             f"{'plain':<8}{'':<8}{'':>4}{p['passes_per_image']:>12.1f}{1.0:>10.2f}{p['seconds_per_image']:>9.3f}"
             f"{1.0:>7.2f}x{1.0:>7.2f}x"]
    for r in result["sjd"]:
        lines.append(f"{'sjd':<8}{r['init']:<8}{r['window']:>4}{r['passes_per_image']:>12.1f}"
                     f"{r['mean_tokens_per_pass']:>10.2f}{r['seconds_per_image']:>9.3f}"
                     f"{r['step_compression']:>7.2f}x{r['latency_speedup']:>7.2f}x")
    return "\n".join(lines)


def plot(result: dict, size=(960, 400)):
    """Left: step compression and latency speedup per setting. Right: tokens fixed per pass at the largest
    window, one histogram per init. Drawn with Pillow."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    colors = {"steps": (52, 101, 164), "speed": (230, 140, 40), "random": (52, 101, 164), "above": (78, 154, 6)}
    rows = result["sjd"]

    # left panel: grouped bars
    x0, x1, y0, y1 = 50, 520, 40, size[1] - 60
    top = max(2.0, *(max(r["step_compression"], r["latency_speedup"]) for r in rows)) * 1.1
    y_of = lambda v: y1 - (y1 - y0) * v / top  # noqa: E731
    d.text((x0, 10), f"SJD vs plain on {Path(str(result['model'])).name}: steps (blue), wall-clock (orange)",
           fill="black")
    d.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    for v in range(0, int(top) + 1):
        d.line([x0 - 4, y_of(v), x0, y_of(v)], fill="black")
        d.text((x0 - 30, y_of(v) - 6), f"{v}x", fill="black")
    d.line([x0, y_of(1.0), x1, y_of(1.0)], fill=(200, 0, 0))  # no gain
    slot = (x1 - x0) / len(rows)
    for i, r in enumerate(rows):
        left = x0 + i * slot + slot * 0.15
        bar = slot * 0.35
        for j, key in enumerate(("step_compression", "latency_speedup")):
            d.rectangle([left + j * bar, y_of(r[key]), left + (j + 1) * bar - 2, y1],
                        fill=colors["steps" if j == 0 else "speed"])
        d.text((x0 + i * slot + 4, y1 + 6), f"{r['init'][:3]}", fill="black")
        d.text((x0 + i * slot + 4, y1 + 20), f"L{r['window']}", fill="black")

    # right panel: histograms at the largest window
    window = max(r["window"] for r in rows)
    hists = {r["init"]: {int(k): v for k, v in r["tokens_per_pass_histogram"].items()} for r in rows
             if r["window"] == window}
    x0, x1 = 590, size[0] - 20
    d.text((x0, 10), f"image tokens fixed per pass, L={window}", fill="black")
    d.rectangle([x0, y0, x1, y1], outline=(180, 180, 180))
    kmax = max(max(h) for h in hists.values())
    share = {init: {k: v / sum(h.values()) for k, v in h.items()} for init, h in hists.items()}
    smax = max(max(s.values()) for s in share.values()) * 1.1
    slot = (x1 - x0) / kmax
    for j, (init, s) in enumerate(share.items()):
        bar = slot / (len(share) + 0.5)
        for k, frac in s.items():
            left = x0 + (k - 1) * slot + j * bar
            d.rectangle([left, y1 - (y1 - y0) * frac / smax, left + bar - 1, y1], fill=colors.get(init, (90, 90, 90)))
        d.text((x1 - 90, y0 + 8 + 14 * j), init, fill=colors.get(init, (90, 90, 90)))
    for k in range(1, kmax + 1, max(1, kmax // 8)):
        d.text((x0 + (k - 0.6) * slot, y1 + 6), str(k), fill="black")
    d.text((x0 - 40, y0 - 2), f"{smax:.0%}", fill="black")
    return img


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mini", help="mini or a model folder")
    ap.add_argument("--images", type=int, default=8, help="images per setting (each drawn alone)")
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    ap.add_argument("--cfg", type=float, default=None, help="guidance (default: the model family's)")
    ap.add_argument("--top-k", type=int, default=None, help="image top-k (default: the model family's)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i, for every sampler")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's target: 2 CPU cores)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    try:
        result = run(args)
    except UserError as e:
        sys.exit(f"sjd benchmark: error: {e}")
    print()
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "sjd.json", result)
    atomic_save_image(plot(result), args.out / "sjd.png")
    print(f"\nwrote {args.out / 'sjd.json'} and {args.out / 'sjd.png'}")


if __name__ == "__main__":
    main()
