"""benchmarks/gpu_first_light.py works before a GPU is spent on it: its --tiny mode runs every entry (both
architectures; stage 1, stage 2 Q/K/V with 8-bit AdamW, LoRA, QLoRA; plain and SJD sampling at batch 1 and 4)
on the CPU with the same configurations narrowed, and writes the results JSON with the planner's figure
beside each measurement."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_first_light.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_first_light", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_first_light_runs_every_kind_of_entry_on_tiny_configs_on_the_cpu(tmp_path):
    """Every entry on Janus-Pro's architecture (the Lumina-mGPT one is built in the next test: its full-size
    VQGAN and 65,536-token vocabulary make each of its entries several seconds on a CPU)."""
    bench = load_benchmark()
    out = tmp_path / "gpu.json"
    results = bench.main(["--tiny", "--device", "cpu", "--out", str(out), "--steps", "1", "--only", "janus"])
    assert json.loads(out.read_text()) == results
    assert results["device"].startswith("cpu") and results["tiny"] and not results["skipped"]
    rows = results["entries"]
    assert len(rows) == len(bench.TRAINING) + len(bench.SAMPLING) and not [r for r in rows if "error" in r]
    assert {r["entry"] for r in rows} == {e.name for e in bench.TRAINING + bench.SAMPLING}
    for row in rows:
        assert row["planned_bytes"] > 0 and row["peak_bytes"] is None  # no allocator statistics on the CPU
        if row["kind"] == "training":
            assert row["seconds_per_step"] > 0
        else:
            assert row["ms_per_image"] > 0 and row["forward_passes"] > 0 and row["tokens_per_second"] > 0
    sjd = [r for r in rows if r["kind"] == "sampling" and r["phase"] == "sampling-sjd"]
    assert {r["batch"] for r in sjd} == {1, 4} and all(r["sjd_tokens_per_pass"] >= 1 for r in sjd)


def test_entries_can_be_picked_and_a_budget_skips_what_would_start_late(tmp_path):
    bench = load_benchmark()
    picked = bench.entries("QLoRA")
    assert len(picked) == len(bench.MODELS) and all("QLoRA" in e.name for _, e in picked)
    assert {m.name for m in bench.MODELS} == {"lumina-mgpt-7b-768", "janus-pro-7b", "emu3-gen"}
    results = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "gpu.json"), "--only", "lumina",
                          "--steps", "1", "--budget-s", "0.5"])
    every = len(bench.TRAINING) + len(bench.SAMPLING)
    assert len(results["entries"]) == 1 and len(results["skipped"]) == every - 1  # the first starts at once
    first = results["entries"][0]
    assert first["model"] == "lumina-mgpt-7b-768" and first["seconds_per_step"] > 0 and first["planned_bytes"] > 0


def test_emu3_runs_every_entry_on_its_tiny_config(tmp_path):
    bench = load_benchmark()
    results = bench.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "gpu.json"), "--only", "emu3",
                          "--steps", "1"])
    rows = results["entries"]
    assert len(rows) == len(bench.TRAINING) + len(bench.SAMPLING) and not [r for r in rows if "error" in r]
    assert {r["model"] for r in rows} == {"emu3-gen"} and all(r["planned_bytes"] > 0 for r in rows)
    assert all(r["ms_per_image"] > 0 for r in rows if r["kind"] == "sampling")
