"""What personalization costs on mini, measured side by side in one run.

    python benchmarks/personalize.py [--model mini] [--steps 20] [--repeats 3]

- seconds per step of stage 1 (embedding only), stage 2 with full Q/K/V, stage 2 with LoRA: the settings
  run in turn, round after round (a slow spell of a shared machine hits all of them), median of the rounds
- end-to-end time of the default two-stage run (mini's defaults, the demo's setting)
- peak resident memory of this process after each part
- what caching the reference images' VQ tokens buys: a step that re-encodes its batch's images against a
  step that looks them up (both measured here, same batches)
Writes benchmarks/results/personalize.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tokenbooth.backbones import load_backbone
from tokenbooth.io import atomic_write_json, read_jsonl
from tokenbooth.personalize import TrainConfig, load_reference_images, train
from tokenbooth.personalize import run_folder
from tokenbooth.personalize.loss import batch_loss, make_batch, reference_tokens
from tokenbooth.personalize.placeholder import Placeholder
from tokenbooth.vq import pil_to_tensor
from tokenbooth.toyworld import demo_subject

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seconds_per_step(model: str, images, steps: int, **overrides) -> float:
    """Runs a one-stage personalization of `steps` steps and returns its mean step time (first step excluded)."""
    backbone = load_backbone(model)
    cfg = TrainConfig.for_family(backbone.family, class_name="robot", **overrides)
    with tempfile.TemporaryDirectory() as out:
        train(backbone, images, cfg, Path(out), progress=False)
        records = read_jsonl(Path(out) / run_folder.LOG)
    times = [r["seconds"] for r in records][1:]
    return sum(times) / len(times)


def caching_speedup(model: str, images, steps: int) -> tuple[float, float]:
    """(seconds per step re-encoding the batch's images, seconds per step with cached tokens)."""
    backbone = load_backbone(model)
    cfg = TrainConfig.for_family(backbone.family, class_name="robot")
    gen = torch.Generator().manual_seed(0)
    placeholder = Placeholder(backbone, cfg, gen)
    optimizer = torch.optim.AdamW([placeholder.embedding], lr=cfg.stage1_lr)
    pixels = pil_to_tensor(images)
    cached = reference_tokens(backbone, images, flip=False)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731

    def step(encode_each_time: bool):
        if encode_each_time:  # what a trainer without the cache does: tokenize the batch's images again
            picks = torch.randint(len(images), (cfg.batch_size,), generator=gen)
            backbone.encode_images(pixels[picks])
        ids, labels = make_batch(backbone, placeholder, cfg, cached, gen, subject=True)
        loss = batch_loss(backbone, placeholder, ids, labels, no_autocast)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    result = {}
    for mode in (True, False, True, False):  # interleaved
        t0 = time.perf_counter()
        for _ in range(steps):
            step(mode)
        result.setdefault(mode, []).append((time.perf_counter() - t0) / steps)
    return min(result[True]), min(result[False])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mini")
    ap.add_argument("--steps", type=int, default=20, help="steps timed per setting")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the settings; figures are their medians")
    ap.add_argument("--out", type=Path, default=RESULTS / "personalize.json")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    images = load_reference_images(demo_subject.FOLDER, load_backbone(args.model).resolution)
    settings = {
        "stage 1 (embedding)": dict(stages="embedding", stage1_steps=args.steps),
        # a joint step costs what a stage-2 step costs: [V] and the layers both learn
        "stage 2 (full Q/K/V)": dict(stages="joint", stage1_steps=args.steps - 1, stage2_steps=1, layers="qkv"),
        "stage 2 (LoRA r=4)": dict(stages="joint", stage1_steps=args.steps - 1, stage2_steps=1, layers="lora"),
    }
    runs, memory = {name: [] for name in settings}, {}
    for _ in range(args.repeats):
        for name, overrides in settings.items():
            runs[name].append(seconds_per_step(args.model, images, args.steps, **overrides))
            memory.setdefault(name, peak_rss_mb())  # the process's peak so far: meaningful in the first round
    rows = {name: statistics.median(times) for name, times in runs.items()}
    t0 = time.perf_counter()
    backbone = load_backbone(args.model)
    cfg = TrainConfig.for_family(backbone.family, class_name="robot")
    with tempfile.TemporaryDirectory() as out:
        train(backbone, images, cfg, Path(out), progress=False)
    end_to_end = time.perf_counter() - t0
    memory["two-stage end to end"] = peak_rss_mb()
    reencode, cached = caching_speedup(args.model, images, args.steps)
    result = {
        "model": args.model, "batch_size": cfg.batch_size, "seconds_per_step": rows,
        "seconds_per_step_runs": runs, "repeats": args.repeats,
        "end_to_end_seconds": end_to_end, "end_to_end_steps": cfg.stage1_steps + cfg.stage2_steps,
        "peak_rss_mb_after": memory,
        "vq_cache": {"reencode_seconds_per_step": reencode, "cached_seconds_per_step": cached,
                     "speedup": reencode / cached},
        "threads": torch.get_num_threads(),
    }
    print(f"{'part':<26}{'s/step':>8}{'peak MB':>9}")
    for name in rows:
        print(f"{name:<26}{rows[name]:>8.3f}{memory[name]:>9.0f}")
    print(f"two-stage end to end: {end_to_end:.1f}s for {result['end_to_end_steps']} steps "
          f"(peak {memory['two-stage end to end']:.0f} MB)")
    print(f"VQ token cache: {reencode:.3f} s/step re-encoding vs {cached:.3f} cached = {reencode / cached:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)


if __name__ == "__main__":
    main()
