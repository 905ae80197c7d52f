"""The memory tables of docs/gpu.md, from `tokenbooth plan`'s figures (fake tensors, no weights needed).

For each published model: the peak of stage 1, stage 2 on Q/K/V, stage 2 with LoRA, and QLoRA (a 4-bit
base, LoRA; the larger of its two stages), with and without gradient checkpointing, at the paper's 8 pairs per
step; sampling with CFG and SJD; and the issue's goals, planned.

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
from tokenbooth.plan import RunSettings, describe, fitting_settings, measure  # noqa: E402
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
GOALS = [  # (what the issue asks, model, budget in GB, the settings to start from)
    ("Lumina-mGPT 7B 768, two-stage QLoRA", "lumina-mgpt-7b-768", 22,
     {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Janus-Pro 7B", "janus-pro-7b", 16, {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Janus-Pro 1B", "janus-pro-1b", 8, {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
    ("Lumina-mGPT 7B 768, the paper's full Q/K/V, 8-bit AdamW", "lumina-mgpt-7b-768", 40,
     {"optimizer": "adamw8bit", "gradient_checkpointing": True}),
]
GB = 1e9


def settings(model: str, **train) -> RunSettings:
    family = MODELS[model]
    return RunSettings(train=TrainConfig.for_family(family, class_name="dog", **train),
                       sample=SamplingConfig.for_family(family), num_images=1)


def main() -> None:
    results = {"models": {}, "goals": []}
    for model in MODELS:
        row = results["models"][model] = {}
        for ckpt in (True, False):
            for column, phases in COLUMNS.items():
                t0 = time.time()
                peak = max(measure(model, phase, settings(model, gradient_checkpointing=ckpt, **fields)).peak_bytes
                           for phase, fields in phases)
                row[f"{column}{', checkpointing' if ckpt else ''}"] = peak
                print(f"{model:<22} {column:<16} checkpointing={ckpt!s:<5} {peak / GB:6.2f} GB ({time.time() - t0:.0f}s)",
                      flush=True)
        for n in (1, 4):
            for phase in ("sampling-cfg", "sampling-sjd"):
                row[f"{phase}, {n} image(s)"] = measure(model, phase, replace(settings(model), num_images=n)).peak_bytes
    for goal, model, budget, fields in GOALS:
        start = settings(model, **fields)
        own = max(measure(model, phase, start).peak_bytes for phase in ("stage1", "stage2"))
        found = fitting_settings(model, start, int(budget * GB + ALLOCATOR_RESERVE), limit=3)
        best = found[0] if found else None
        results["goals"].append({"goal": goal, "model": model, "budget_gb": budget, "settings": describe(start),
                                 "peak_bytes": own, "met": own <= budget * GB,
                                 "fastest_fitting": describe(best.settings) if best else None,
                                 "fastest_fitting_peak_bytes": best.peak_bytes if best else None})
        print(results["goals"][-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print_tables(results)


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
