"""First light on a GPU: the real architectures (Lumina-mGPT 7B 768, Janus-Pro 7B, from their shipped
configurations in assets/configs) with random weights, built straight on the device (no download, no CPU
copy: memory and step time do not depend on the weights' values). For each entry it measures the peak of
`torch.cuda.max_memory_allocated` and the time of a training step or of a sampling batch, and puts the
planner's prediction for the same phase (`tokenbooth plan`'s `estimate`) beside it.

  training  stage 1; stage 2 on Q/K/V with 8-bit AdamW and checkpointing; stage 2 LoRA; QLoRA (nf4 base, LoRA,
            checkpointing); the paper's 8 pairs a step; seconds a step (median of the timed steps, after a
            warm-up step)
  sampling  plain and SJD (the family's settings: guidance on), batch 1 and 4: ms per image, forward passes
            a batch, image tokens per second. Random weights give near-uniform distributions, so SJD accepts
            what it would on noise: its passes here say nothing of a trained model's speed-up, its memory does.

Every entry is one item of TRAINING or SAMPLING (or of MODELS): another family or SJD variant is one more
line there. Results go to benchmarks/results/gpu.json (written after every entry, atomically, with the
device's name), so a run cut short keeps what it measured; --budget-s skips what would start too late.

    PYTHONPATH=src python benchmarks/gpu_first_light.py                 # a GPU: under 8 minutes on an H100
    PYTHONPATH=src python benchmarks/gpu_first_light.py --tiny --out /tmp/gpu.json   # CPU, tiny configs, seconds

--tiny (the CPU test, tests/test_gpu_first_light.py): the same configurations narrowed to a few layers of 64
wide, 64-px images, so the script is known to work before a GPU is spent on it; on the CPU the peak column is
left empty (torch.cuda has no allocator statistics there).
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tokenbooth.backbones.quantize import quantize_layers  # noqa: E402
from tokenbooth.io import atomic_write_json  # noqa: E402
from tokenbooth.personalize.recipe import TrainConfig, _autocast_for, encode_each, train_step  # noqa: E402
from tokenbooth.plan import RunSettings, estimate, measure  # noqa: E402
from tokenbooth.plan.blueprints import blueprint  # noqa: E402
from tokenbooth.plan.phases import REFERENCES, set_up_stage, training_batch  # noqa: E402
from tokenbooth.sampling import SamplingConfig, draw  # noqa: E402
from tokenbooth.sampling.sjd import SJDStats  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "gpu.json"
STEPS = 2  # timed training steps per entry, after one warm-up step
PROMPT = "a photo of a dog on the beach"


@dataclass(frozen=True)
class Model:
    name: str  # a shipped configuration (assets/configs) the planner knows
    family: str
    tiny: dict  # --tiny: config entries that narrow it (nested dicts merge), and its image size
    tiny_resolution: int | None = None


@dataclass(frozen=True)
class Training:
    name: str
    phase: str  # the planner's: "stage1" or "stage2"
    train: dict = field(default_factory=dict)  # TrainConfig fields over the family's defaults


@dataclass(frozen=True)
class Sampling:
    name: str
    batch: int  # images drawn at once
    sample: dict = field(default_factory=dict)  # SamplingConfig fields over the family's defaults


NARROW_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=2)
MODELS = [
    Model("lumina-mgpt-7b-768", "lumina-mgpt", NARROW_TEXT, tiny_resolution=64),
    Model("janus-pro-7b", "janus-pro", {
        "text_config": {**NARROW_TEXT, "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2},
        "vision_config": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=64,
                              image_size=64),
        "vq_config": dict(base_channels=32, num_res_blocks=1, projection_dim=64, image_token_embed_dim=64,
                          num_embeddings=64)}),
    # Emu3-Gen at 720 px: 8,191 tokens an image, so its sampling entries are the longest; --tiny narrows its text
    # model and its VQ-VAE (8x down-sampling kept, 4 channels, 64 codes) and draws 64 px
    Model("emu3-gen", "emu3", {
        "text_config": {**NARROW_TEXT, "max_position_embeddings": 1024},
        "vq_config": dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                          channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32)},
        tiny_resolution=64),
]
TRAINING = [
    Training("stage 1", "stage1"),
    Training("stage 2 Q/K/V, 8-bit AdamW, checkpointing", "stage2",
             {"layers": "qkv", "optimizer": "adamw8bit", "gradient_checkpointing": True}),
    Training("stage 2 LoRA", "stage2", {"layers": "lora"}),
    Training("QLoRA (nf4), checkpointing", "stage2",
             {"layers": "lora", "quantize": "nf4", "gradient_checkpointing": True}),
]
SAMPLING = [
    Sampling("plain", 1, {"sampler": "plain"}),
    Sampling("plain", 4, {"sampler": "plain"}),
    Sampling("sjd", 1, {"sampler": "sjd"}),
    Sampling("sjd", 4, {"sampler": "sjd"}),
]
STAGES = {"stage1": "embedding", "stage2": "layers"}


def build(model: Model, device: str, tiny: bool):
    """The backbone with random weights, made on `device` directly (its initialization runs there)."""
    with torch.device(device):
        return blueprint(model.name, resolution=model.tiny_resolution if tiny else None,
                         overrides=model.tiny if tiny else None)


def predicted(model: Model, phase: str, settings: RunSettings, tiny: bool) -> int:
    """The planner's peak for the phase: `estimate` as `tokenbooth plan` takes it (the tiny configs are
    measured whole: they are not the shipped depth)."""
    if tiny:
        return measure(model.name, phase, settings, resolution=model.tiny_resolution, overrides=model.tiny).peak_bytes
    return estimate(model.name, phase, settings)


class Peak:
    """torch.cuda's peak of allocated bytes from `start()` on (None on the CPU)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None


def run_training(model: Model, entry: Training, device: str, tiny: bool, steps: int) -> dict:
    """The recipe's stage as the planner's train_phase sets it up (plan/phases.py), then warm-up + timed steps."""
    settings = RunSettings(train=TrainConfig.for_family(model.family, class_name="dog", **entry.train))
    plan = predicted(model, entry.phase, settings, tiny)
    backbone = build(model, device, tiny)
    cfg, stage = settings.train, STAGES[entry.phase]
    quantize_layers(backbone.decoder_layers(), cfg.quantize)  # as loading does, before the phase (and its peak)
    peak = Peak(device)
    peak.start()
    if stage == "embedding":  # the references are encoded before the first stage
        encode_each(backbone, torch.zeros(REFERENCES, 3, backbone.resolution, backbone.resolution))
    placeholder, trainable, optimizer = set_up_stage(backbone, stage, cfg)
    batch = (*training_batch(backbone, placeholder, cfg), 1.0)
    autocast = _autocast_for(backbone)
    times = []
    for _ in range(steps + 1):
        peak.sync()
        t0 = time.perf_counter()
        train_step(backbone, placeholder, [batch], cfg, optimizer, trainable, autocast)
        peak.sync()
        times.append(time.perf_counter() - t0)
    measured = peak.bytes()
    return {"kind": "training", "phase": entry.phase, "batch_size": cfg.batch_size,
            "seconds_per_step": round(statistics.median(times[1:]), 4), "warmup_seconds": round(times[0], 3),
            **figures(measured, plan)}


def run_sampling(model: Model, entry: Sampling, device: str, tiny: bool) -> dict:
    """One batch of images through the one sampling entry point (`sampling.draw`), after a warm-up pass."""
    sample = SamplingConfig.for_family(model.family, **entry.sample)
    settings = RunSettings(train=TrainConfig.for_family(model.family, class_name="dog"), sample=sample,
                           num_images=entry.batch, sample_quantize="none")
    phase = "sampling-sjd" if sample.sampler == "sjd" else "sampling-cfg"
    plan = predicted(model, phase, settings, tiny)
    backbone = build(model, device, tiny)
    with torch.no_grad():  # kernels chosen and the allocator warm before the clock starts
        backbone.image_logits(torch.tensor([backbone.prompt_ids(PROMPT)]))
    peak = Peak(device)
    peak.start()
    drawing = draw(backbone, [PROMPT] * entry.batch, sample)
    peak.sync()
    tokens = entry.batch * backbone.layout.body_length
    out = {"kind": "sampling", "phase": phase, "batch": entry.batch, "cfg_scale": sample.cfg_scale,
           "ms_per_image": round(1000 * drawing.seconds / entry.batch, 1),
           "forward_passes": drawing.stats.forward_passes,
           "passes_per_image": round(drawing.stats.forward_passes / entry.batch, 1),
           "tokens_per_second": round(tokens / drawing.seconds, 1)}
    if isinstance(drawing.stats, SJDStats):
        out["sjd_window"] = sample.sjd_window
        out["sjd_tokens_per_pass"] = round(drawing.stats.mean_tokens_per_pass, 3)
    return {**out, **figures(peak.bytes(), plan)}


def figures(measured: int | None, plan: int) -> dict:
    return {"peak_bytes": measured, "planned_bytes": plan,
            "planned_over_measured": None if not measured else round(plan / measured, 3)}


def entries(only: str | None) -> list[tuple[Model, object]]:
    """Every (model, entry): training first, then sampling, the model with the shorter image block first
    (Janus-Pro's 576 tokens; Lumina-mGPT 768's 2,352 take minutes a batch), so that a budget cut falls on the
    last; `only`: those whose model or entry name contains it (a second call can take what a cut skipped)."""
    by_length = sorted(MODELS, key=lambda m: m.family != "janus-pro")
    every = [(m, e) for m in MODELS for e in TRAINING] + [(m, e) for m in by_length for e in SAMPLING]
    return [(m, e) for m, e in every if only is None or only in m.name or only in e.name]


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (the CPU test)")
    p.add_argument("--device", help="default: cuda, or cpu with --tiny")
    p.add_argument("--out", type=Path, default=OUT, help=f"results JSON (default: {OUT})")
    p.add_argument("--steps", type=int, default=STEPS, help=f"timed training steps per entry (default: {STEPS})")
    p.add_argument("--only", help="only the entries whose model or name contains this")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="start no entry after this many seconds (default: 450: within 8 minutes on an H100)")
    args = p.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        p.error("no GPU here: pass --tiny (and --device cpu) to run the tiny configs on the CPU")
    results = {"device": device_name(device), "torch": torch.__version__, "tiny": args.tiny, "random_weights": True,
               "entries": [], "skipped": [], "seconds": 0.0}
    t0 = time.time()
    for model, entry in entries(args.only):
        label = {"model": model.name, "entry": entry.name}
        if time.time() - t0 > args.budget_s:
            results["skipped"].append({**label, "why": f"over the {args.budget_s:.0f}s budget"})
            continue
        start = time.time()
        try:
            if isinstance(entry, Training):
                row = run_training(model, entry, device, args.tiny, args.steps)
            else:
                row = run_sampling(model, entry, device, args.tiny)
        except torch.OutOfMemoryError as e:  # a figure too: the planner should have said so
            row = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        row = {**label, **row, "wall_seconds": round(time.time() - start, 1)}
        results["entries"].append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        results["seconds"] = round(time.time() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out, results)  # after every entry: a run cut short keeps what it measured
    results["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
