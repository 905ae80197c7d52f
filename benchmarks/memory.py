"""Validates `tokenbooth plan`: its predicted peak memory against the peak a real run allocates on this CPU.

For each check the phase runs twice through the same code (plan/phases.py): on fake tensors, where the
planner counts live storage (plan/tracker.LiveBytes), and for real on the CPU under torch's profiler, whose
allocator events give the measured peak (tracker.measured_peak). Models: mini, tiny Chameleon and Janus-Pro
configurations, and Lumina-mGPT 7B's real architecture cut to 2 layers (its widths, its 65,536-token
vocabulary, a 768-px sequence: 2,353 image-block tokens) at batch 1. The issue's bar: within 15%.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/memory.py [--only NAME] [--skip-large]

writes benchmarks/results/memory.json: {"checks": [{"config", "predicted_bytes", "measured_bytes", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenbooth.personalize.recipe import TrainConfig  # noqa: E402
from tokenbooth.plan import RunSettings, measure, run_phase  # noqa: E402
from tokenbooth.plan.blueprints import blueprint  # noqa: E402
from tokenbooth.plan.phases import quantize_base  # noqa: E402
from tokenbooth.plan.tracker import measured_peak  # noqa: E402
from tokenbooth.sampling import SamplingConfig  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "memory.json"
TOLERANCE = 0.15

# Small stand-ins of the real families: Lumina-mGPT's transformer shrunk, at 256 px; Janus-Pro's language model and
# vision tower shrunk. Both keep their family's real image tokenizer.
TINY_CHAMELEON = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vq_config=dict(base_channels=32, num_res_blocks=1))
TINY_JANUS = dict(text_config=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=4096, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=2),
                  vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=256),
                  vq_config=dict(projection_dim=256, image_token_embed_dim=256))

VARIANTS = {  # name -> (phase, TrainConfig fields)
    "stage1": ("stage1", {}),
    "stage2-qkv": ("stage2", {}),
    "stage2-lora": ("stage2", {"layers": "lora"}),
    "qlora-nf4": ("stage2", {"layers": "lora", "quantize": "nf4"}),
    "stage1-checkpointing": ("stage1", {"gradient_checkpointing": True}),
    "stage2-qkv-lean": ("stage2", {"gradient_checkpointing": True, "optimizer": "adamw8bit",
                                   "gradient_accumulation_steps": 2}),
    "sampling-cfg": ("sampling-cfg", {}),
    "sampling-sjd": ("sampling-sjd", {}),
}


def checks(skip_large: bool):
    small = dict(batch_size=4)
    yield "mini", dict(), small, 2, list(VARIANTS)
    yield "tiny-chameleon", dict(model="lumina-mgpt-7b-768", resolution=256, overrides=TINY_CHAMELEON), small, 2, \
        list(VARIANTS)
    yield "tiny-janus", dict(model="janus-pro-1b", overrides=TINY_JANUS), small, 2, list(VARIANTS)
    if not skip_large:
        yield "lumina-mgpt-7b-768-2layers", dict(model="lumina-mgpt-7b-768", layers=2), dict(batch_size=1), 1, \
            ["stage1", "stage2-qkv", "stage2-lora", "qlora-nf4", "sampling-cfg"]


def settings_for(variant: str, train: dict, num_images: int) -> tuple[str, RunSettings]:
    phase, train_fields = VARIANTS[variant]
    return phase, RunSettings(train=TrainConfig.for_family("lumina-mgpt", class_name="dog", **train, **train_fields),
                              sample=SamplingConfig.for_family("lumina-mgpt", sjd_window=16), num_images=num_images)


def predicted_and_measured(model: dict, phase: str, settings: RunSettings) -> tuple[int, int]:
    name = model.get("model", "mini")
    kwargs = {k: v for k, v in model.items() if k != "model"}
    predicted = measure(name, phase, settings, **{k: kwargs.get(k) for k in ("resolution", "layers")},
                        overrides=kwargs.get("overrides"))
    torch.manual_seed(0)

    def setup():
        backbone = blueprint(name, **kwargs)
        if not phase.startswith("sampling"):
            quantize_base(backbone, settings)
        return backbone

    measured = measured_peak(setup, lambda backbone: run_phase(backbone, phase, settings))
    return predicted.peak_bytes, measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the checks whose config name contains this")
    ap.add_argument("--skip-large", action="store_true", help="leave out the 2-layer Lumina-mGPT 7B")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = json.loads(OUT.read_text())["checks"] if OUT.exists() and args.only else []
    print(f"{'config':<48} {'predicted':>12} {'measured':>12} {'error':>7} {'seconds':>8}")
    for label, model, train, num_images, variants in checks(args.skip_large):
        for variant in variants:
            config = f"{label}/{variant}"
            if args.only and args.only not in config:
                continue
            phase, settings = settings_for(variant, train, num_images)
            t0 = time.time()
            predicted, measured = predicted_and_measured(model, phase, settings)
            error = predicted / measured - 1
            print(f"{config:<48} {predicted / 1e9:10.3f}GB {measured / 1e9:10.3f}GB {error:+7.1%} {time.time() - t0:8.1f}",
                  flush=True)
            results = [r for r in results if r["config"] != config]
            results.append({"config": config, "predicted_bytes": predicted, "measured_bytes": measured,
                            "relative_error": round(error, 4), "within_15_percent": abs(error) <= TOLERANCE})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"tolerance": TOLERANCE, "device": "cpu", "checks": results}, indent=2) + "\n")
    bad = [r["config"] for r in results if not r["within_15_percent"]]
    print(f"{len(results) - len(bad)}/{len(results)} within {TOLERANCE:.0%}" + (f"; outside: {', '.join(bad)}" if bad else ""))


if __name__ == "__main__":
    main()
