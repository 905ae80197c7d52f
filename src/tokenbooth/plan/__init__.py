"""`tokenbooth plan`: the peak GPU memory of every phase of a run, before a single weight is downloaded.

Each phase (phases.py) runs for real through the backbone classes, the recipe and the sampler, but on fake
tensors built from the model's shipped configuration (blueprints.py): no weights, no memory, no arithmetic
of our own. `tracker.LiveBytes` counts the storage every operator returns while it lives, so the peak is
what PyTorch's allocator would hold. benchmarks/memory.py checks it against real runs on the CPU.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field, replace

from ..errors import UserError
from .phases import RunSettings, quantize_base, sampling_phase, train_phase
from .tracker import ALLOCATOR_RESERVE, fake_run

STAGE_PHASES = {"embedding": "stage1", "layers": "stage2", "joint": "joint"}
SAMPLING_PHASES = ("sampling-cfg", "sampling-sjd")
GB = 1e9


@dataclass
class PhasePlan:
    peak_bytes: int
    flops: int = 0  # per optimizer step (training phases): the speed ranking's measure


@dataclass
class Plan:
    model: str
    settings: RunSettings
    phases: dict[str, PhasePlan] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return max(p.peak_bytes for p in self.phases.values())

    def fits(self, budget: int) -> bool:
        return self.peak_bytes + ALLOCATOR_RESERVE <= budget

    def to_json(self, budget: int | None) -> dict:
        return {"model": self.model,
                "phases": {name: {"peak_bytes": p.peak_bytes} for name, p in self.phases.items()},
                "peak_bytes": self.peak_bytes, "fits": None if budget is None else self.fits(budget)}


def run_phase(backbone, phase: str, settings: RunSettings) -> None:
    """The phase itself, on whatever tensors the backbone holds (fake when planning, real when validating)."""
    if phase == "sampling-cfg":
        sampling_phase(backbone, settings, window=1)
    elif phase == "sampling-sjd":
        sampling_phase(backbone, settings, window=settings.sample.sjd_window)
    else:
        stage = {v: k for k, v in STAGE_PHASES.items()}[phase]
        train_phase(backbone, stage, settings, steps=2)


def measure(model: str, phase: str, settings: RunSettings, resolution: int | None = None,
            layers: int | None = None, overrides: dict | None = None) -> PhasePlan:
    """One phase on fake tensors: its peak live bytes (the weights included) and the step's FLOPs."""
    from .blueprints import blueprint

    settings = copy.deepcopy(settings)  # the recipe's pieces may adjust configs; plans stay independent
    with fake_run() as live:
        backbone = blueprint(model, resolution=resolution, layers=layers, overrides=overrides)
        if phase not in SAMPLING_PHASES:
            quantize_base(backbone, settings, fake=True)
        live.reset_peak()  # loading's transients happen on the CPU, before the model moves to the GPU
        run_phase(backbone, phase, settings)
        return PhasePlan(peak_bytes=live.peak, flops=live.flops // 2)


def plan_memory(model: str, settings: RunSettings, resolution: int | None = None, layers: int | None = None,
                sampling: bool = True) -> Plan:
    """The peak of every phase the settings' run goes through (training stages, then sampling)."""
    phases = [STAGE_PHASES[stage] for stage, _ in settings.train.plan] + (list(SAMPLING_PHASES) if sampling else [])
    plan = Plan(model, settings)
    for phase in phases:
        plan.phases[phase] = measure(model, phase, settings, resolution, layers)
    return plan


# --- settings that fit a budget -----------------------------------------------------------------------

# Relative step time of what the FLOP count does not see: a quantized weight is dequantized for every matrix
# product, forward and backward (torchtune reports QLoRA ~1.3x slower than LoRA in bf16; int8 weight-only
# dequantizes per row, cheaper), and a micro-batch adds a pass of overhead. Heuristics for the ordering only.
QUANTIZE_SLOWDOWN = {"none": 1.0, "int8": 1.15, "nf4": 1.3}
MICRO_BATCH_OVERHEAD = 0.02  # per extra micro-batch of a step
CHECKPOINTING_SLOWDOWN = 4 / 3  # one more forward pass per forward + backward (3 passes' worth)
MEMORY_ORDER = {"quantize": ("nf4", "int8", "none"), "optimizer": ("adamw8bit", "adamw"), "layers": ("lora", "qkv")}


def candidates(settings: RunSettings) -> list[RunSettings]:
    """Variations of the user's settings that trade speed for memory: gradient checkpointing, micro-batches
    with accumulation (the same pairs per step), 8-bit AdamW, a quantized base with LoRA (QLoRA), LoRA in
    place of full Q/K/V. Ordered by their expected speed, the user's own first."""
    train = settings.train
    trains_layers = train.stages != "embedding"
    layer_options = [train.layers] + (["lora"] if train.layers == "qkv" and trains_layers else [])
    accumulations = [a for a in (1, 2, 4, 8, 16)
                     if train.batch_size % a == 0 and a >= train.gradient_accumulation_steps]
    out = []
    for layers, ckpt, accum, optimizer, quantize in itertools.product(
            layer_options, (train.gradient_checkpointing, True), accumulations, (train.optimizer, "adamw8bit"),
            (train.quantize, "int8", "nf4")):
        if quantize != "none" and layers != "lora" and trains_layers:
            continue  # full Q/K/V needs an unquantized base
        if optimizer != train.optimizer and (layers == "lora" or not trains_layers):
            continue  # 8-bit moments of a few thousand LoRA (or [V]) weights save nothing
        option = replace(settings, train=replace(train, layers=layers, gradient_checkpointing=ckpt, optimizer=optimizer,
                                                 gradient_accumulation_steps=accum, quantize=quantize))
        if all(_key(option) != _key(o) for o in out):
            out.append(option)
    return sorted(out, key=lambda o: (_key(o) != _key(settings), _expected_time(o)))


def _key(s: RunSettings) -> tuple:
    t = s.train
    return (t.layers, t.gradient_checkpointing, t.gradient_accumulation_steps, t.optimizer, t.quantize)


def _expected_time(s: RunSettings) -> float:
    t = s.train
    return ((CHECKPOINTING_SLOWDOWN if t.gradient_checkpointing else 1.0) * QUANTIZE_SLOWDOWN[t.quantize]
            * (1 + MICRO_BATCH_OVERHEAD * (t.gradient_accumulation_steps - 1)))


def _needs_more_memory(a: RunSettings, b: RunSettings) -> bool:
    """a needs at least b's memory: on no axis is it leaner."""
    if a.train.gradient_checkpointing and not b.train.gradient_checkpointing:
        return False
    if a.train.gradient_accumulation_steps > b.train.gradient_accumulation_steps:
        return False
    for axis, order in MEMORY_ORDER.items():
        va, vb = getattr(a.train, axis), getattr(b.train, axis)
        if va in order and vb in order and order.index(va) < order.index(vb):
            return False
    return True


def relative_time(plan: Plan) -> float:
    """Step time up to a constant: the training phases' FLOPs (recomputation under checkpointing counted),
    times the quantization and micro-batch factors above."""
    t = plan.settings.train
    flops = sum(p.flops for name, p in plan.phases.items() if name not in SAMPLING_PHASES)
    return flops * QUANTIZE_SLOWDOWN[t.quantize] * (1 + MICRO_BATCH_OVERHEAD * (t.gradient_accumulation_steps - 1))


SCREEN_DEPTHS = (2, 3)  # transformer layers of the quick estimates that decide which candidates to measure
SCREEN_MARGIN = 1.15  # a candidate estimated within this factor of the budget is measured at full depth


def fitting_settings(model: str, settings: RunSettings, budget: int, resolution: int | None = None,
                     limit: int = 5) -> list[Plan]:
    """Up to `limit` variations of `settings` whose training phases fit `budget`, fastest first; sampling
    does not depend on them and is the caller's to check.

    Candidates are tried in their expected speed order. One that is nowhere leaner than a setting that did not
    fit is skipped. The others are first estimated on the model cut to 2 and 3 layers, extrapolated to its
    depth (a few seconds, where the full model takes a minute); only those the estimate puts near or under
    the budget are measured at full depth, and only full-depth figures decide and are reported."""
    from .blueprints import num_layers

    depth = num_layers(model)
    cache: dict[tuple, PhasePlan] = {}

    def phase_plan(phase: str, option: RunSettings, layers: int | None) -> PhasePlan:
        t = option.train  # stage 1 does not depend on the layers trained or the optimizer
        key = (phase, layers, t.gradient_checkpointing, t.gradient_accumulation_steps, t.quantize) + \
            ((t.layers, t.optimizer) if phase != "stage1" else ())
        if key not in cache:
            cache[key] = measure(model, phase, option, resolution, layers)
        return cache[key]

    def training_plan(option: RunSettings, layers: int | None = None) -> Plan:
        plan = Plan(model, option)
        for stage, _ in option.train.plan:
            plan.phases[STAGE_PHASES[stage]] = phase_plan(STAGE_PHASES[stage], option, layers)
        return plan

    def estimate(option: RunSettings) -> int:
        small, larger = (training_plan(option, d).peak_bytes for d in SCREEN_DEPTHS)
        return small + (larger - small) * (depth - SCREEN_DEPTHS[0]) // (SCREEN_DEPTHS[1] - SCREEN_DEPTHS[0])

    options = candidates(settings)
    leanest = [o for o in options if all(_needs_more_memory(other, o) for other in options)]
    if leanest and not training_plan(leanest[0]).fits(budget):
        return []  # nothing is leaner than this one
    fits, misses = [], []
    for option in options:
        if any(_needs_more_memory(option, miss) for miss in misses):
            continue
        if depth > SCREEN_DEPTHS[1] and (estimate(option) + ALLOCATOR_RESERVE) > budget * SCREEN_MARGIN:
            continue
        plan = training_plan(option)
        if plan.fits(budget):
            fits.append(plan)
        else:
            misses.append(option)
        if len(fits) == limit:
            break
    return sorted(fits, key=relative_time)


def describe(settings: RunSettings) -> str:
    """The `tokenbooth train` flags that give these settings' memory-relevant choices."""
    t = settings.train
    flags = [f"--layers {t.layers}" if t.stages != "embedding" else f"--stages {t.stages}",
             "--gradient-checkpointing" if t.gradient_checkpointing else "", f"--batch-size {t.batch_size}",
             f"--gradient-accumulation-steps {t.gradient_accumulation_steps}" if t.gradient_accumulation_steps > 1 else "",
             f"--optimizer {t.optimizer}" if t.optimizer != "adamw" else "",
             f"--quantize {t.quantize}" if t.quantize != "none" else ""]
    return " ".join(f for f in flags if f)


def parse_size(text: str) -> int:
    """'24GB', '24 GiB', '80G', '16000MB' -> bytes (GB = 10^9, GiB = 2^30)."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text or "")
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"--gpu-memory must be a size like 24GB, 24GiB or 80G (got {text!r})")
    number, unit, binary = float(found.group(1)), found.group(2).upper(), found.group(3)
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    if not unit:
        raise UserError(f"--gpu-memory needs a unit, e.g. {text.strip()}GB (got {text!r})")
    return int(number * ((1024 if binary else 1000) ** power))


__all__ = ["Plan", "PhasePlan", "RunSettings", "plan_memory", "fitting_settings", "measure", "parse_size",
           "describe", "relative_time", "candidates"]
