"""The memory tables of docs/gpu.md, from `tokenbooth plan`'s figures (fake tensors, no weights needed).

For each published model: the peak of stage 1, stage 2 on Q/K/V, stage 2 with LoRA, and QLoRA (a 4-bit
base, LoRA; the larger of its two stages), with and without gradient checkpointing, at the paper's 8 pairs per
step; sampling with CFG and SJD; and the issue's goals, planned.

The tables are measured at full depth (`measure`, a quarter of a minute each); each figure is also taken the
way `tokenbooth plan` takes it (`estimate`: 2- and 3-layer cuts extrapolated in depth, 2 micro-batches for N),
and "estimate_check" records how far the two ever are apart.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plan_tables.py

writes benchmarks/results/plan.json and prints the Markdown tables.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenbooth.personalize.recipe import TrainConfig  # noqa: E402
from tokenbooth.plan import RunSettings, candidates, describe, estimate, fitting_settings, measure  # noqa: E402
from tokenbooth.plan.tracker import ALLOCATOR_RESERVE  # noqa: E402
from tokenbooth.sampling import SamplingConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "plan.json"
MODELS = {"lumina-mgpt-7b-512": "lumina-mgpt", "lumina-mgpt-7b-768": "lumina-mgpt",
          "lumina-mgpt-7b-1024": "lumina-mgpt", "janus-pro-1b": "janus-pro", "janus-pro-7b": "janus-pro"}
COLUMNS = {  # name -> [(phase, TrainConfig fields)]: the column's figure is the largest of these phases
    "stage 1": [("stage1", {})],
    "stage 2 Q/K/V": [("stage2", {})],
    "stage 2 LoRA": [("stage2", {"layers": "lora"})],
    "QLoRA (nf4)": [("stage1", {"layers": "lora", "quantize": "nf4"}), ("stage2", {"layers": "lora", "quantize": "nf4"})],
}
GOALS = [  # (what the issue asks, model, budget in GB, the settings to start from); the chunked loss is always on
    ("Lumina-mGPT 7B 768, two-stage QLoRA", "lumina-mgpt-7b-768", 22,
     {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Janus-Pro 7B", "janus-pro-7b", 16, {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Janus-Pro 1B", "janus-pro-1b", 8, {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Lumina-mGPT 7B 768, the paper's full Q/K/V, 8-bit AdamW, checkpointing", "lumina-mgpt-7b-768", 40,
     {"optimizer": "adamw8bit", "gradient_checkpointing": True}),
]
GB = 1e9


def settings(model: str, **train) -> RunSettings:
    family = MODELS[model]
    return RunSettings(train=TrainConfig.for_family(family, class_name="dog", **train),
                       sample=SamplingConfig.for_family(family), num_images=1)


def main() -> None:
    goals_only = "--goals-only" in sys.argv  # keep the tables of the last run, plan the goals again
    results = json.loads(OUT.read_text()) if goals_only and OUT.exists() else {"models": {}, "estimates": {}}
    results["goals"] = []
    for model in [] if goals_only else MODELS:
        row = results["models"][model] = {}
        estimated = results["estimates"][model] = {}

        def both(name: str, phase: str, s: RunSettings) -> None:
            row[name] = max(row.get(name, 0), measure(model, phase, s).peak_bytes)
            estimated[name] = max(estimated.get(name, 0), estimate(model, phase, s).peak_bytes)

        for ckpt in (True, False):
            for column, phases in COLUMNS.items():
                t0 = time.time()
                name = f"{column}{', checkpointing' if ckpt else ''}"
                for phase, fields in phases:
                    both(name, phase, settings(model, gradient_checkpointing=ckpt, **fields))
                print(f"{model:<22} {name:<30} {row[name] / GB:6.2f} GB, estimated {estimated[name] / GB:6.2f} GB "
                      f"({time.time() - t0:.0f}s)", flush=True)
        for n in (1, 4):
            for phase in ("sampling-cfg", "sampling-sjd"):
                both(f"{phase}, {n} image(s)", phase, replace(settings(model), num_images=n))
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    differences = [abs(results["estimates"][m][k] - v) for m, row in results["models"].items() for k, v in row.items()]
    results["estimate_check"] = {"figures": len(differences), "largest_difference_bytes": max(differences, default=0)}
    print(results["estimate_check"], flush=True)
    for goal, model, budget, fields in GOALS:
        start = settings(model, **fields)
        own = max(estimate(model, phase, start).peak_bytes for phase in ("stage1", "stage2"))
        limit = budget * GB + ALLOCATOR_RESERVE
        # The fastest setting that fits and keeps the goal's trained layers (Q/K/V stays Q/K/V), and the
        # fastest of any kind, as `tokenbooth plan --gpu-memory` lists them.
        found = fitting_settings(model, start, int(limit), limit=len(candidates(start)))
        same = [p for p in found if p.settings.train.layers == start.train.layers]
        results["goals"].append({"goal": goal, "model": model, "budget_gb": budget, "settings": describe(start),
                                 "peak_bytes": own, "met": own <= budget * GB,
                                 "fastest_fitting": describe(found[0].settings) if found else None,
                                 "fastest_fitting_peak_bytes": found[0].peak_bytes if found else None,
                                 "fastest_fitting_same_layers": describe(same[0].settings) if same else None,
                                 "fastest_fitting_same_layers_peak_bytes": same[0].peak_bytes if same else None})
        print(results["goals"][-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)
    for g in results["goals"]:
        print(f"| {g['goal']} | {g['budget_gb']} GB | {g['settings']}: {g['peak_bytes'] / GB:.1f} GB | "
              f"{g['fastest_fitting_same_layers']}: {g['fastest_fitting_same_layers_peak_bytes'] / GB:.1f} GB | "
              f"{g['fastest_fitting']}: {g['fastest_fitting_peak_bytes'] / GB:.1f} GB |")


def print_tables(results: dict) -> None:
    for ckpt in (True, False):
        suffix = ", checkpointing" if ckpt else ""
        print(f"\n| 8 pairs per step{suffix or ', no checkpointing'} | " + " | ".join(COLUMNS) + " |")
        print("|---" * (len(COLUMNS) + 1) + "|")
        for model, row in results["models"].items():
            print(f"| {model} | " + " | ".join(f"{row[c + suffix] / GB:.1f} GB" for c in COLUMNS) + " |")
    print("\n| sampling | CFG, 1 image | SJD, 1 image | CFG, 4 images | SJD, 4 images |\n|---|---|---|---|---|")
    for model, row in results["models"].items():
        print(f"| {model} | " + " | ".join(f"{row[f'{p}, {n} image(s)'] / GB:.1f} GB"
                                          for n in (1, 4) for p in ("sampling-cfg", "sampling-sjd")) + " |")


if __name__ == "__main__":
    main()
