"""`tokenbooth plan`: the peak GPU memory of every phase of a run, before a single weight is downloaded.

Each phase (phases.py) runs for real through the backbone classes, the recipe and the sampler, but on fake
tensors built from the model's shipped configuration (blueprints.py): no weights, no memory, no arithmetic
of our own. `tracker.LiveBytes` counts the storage every operator returns while it lives, so the peak is
what PyTorch's allocator would hold. benchmarks/memory.py checks it against real runs on the CPU.

A 32-layer model takes seconds a phase that way and a search for settings that fit tries dozens, so plans
are measured on the model cut to 2 and 3 transformer layers and extrapolated in depth (`estimate`): every
layer adds the same weights, optimizer state and saved activations, so each moment's live bytes and the FLOPs
are linear in depth. On the five published models the extrapolation equals the full-depth measurement
(benchmarks/plan_tables.py checks every figure of docs/gpu.md's tables).
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field, replace

from ..errors import UserError
from ..personalize import lean
from .blueprints import blueprint, num_layers
from .phases import RunSettings, can_sample_quantized, quantize_base, sampling_phase, train_phase, validation_phase
from .tracker import ALLOCATOR_RESERVE, fake_run

STAGE_PHASES = {"embedding": "stage1", "layers": "stage2", "joint": "joint"}
VALIDATION = "validation"
SAMPLING_PHASES = ("sampling-cfg", "sampling-sjd")
GB = 1e9


@dataclass
class PhasePlan:
    peak_bytes: int
    flops: int = 0  # of a training step's passes (not the references' encoding): the speed ranking's measure
    regions: dict[str, int] = field(default_factory=dict)  # the peak of each region (tracker.region)


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
    elif phase == VALIDATION:
        validation_phase(backbone, settings)
    else:
        stage = {v: k for k, v in STAGE_PHASES.items()}[phase]
        train_phase(backbone, stage, settings)


def measure(model: str, phase: str, settings: RunSettings, resolution: int | None = None,
            layers: int | None = None, overrides: dict | None = None) -> PhasePlan:
    """One phase on fake tensors: its peak live bytes (the weights included), by region too, and a training
    step's FLOPs."""
    settings = copy.deepcopy(settings)  # the recipe's pieces may adjust configs; plans stay independent
    with fake_run() as live:
        backbone = blueprint(model, resolution=resolution, layers=layers, overrides=overrides)
        quantize_base(backbone, settings, fake=True, kind=base_bits(phase, settings))
        live.reset_peak()  # loading's transients happen on the CPU, before the model moves to the GPU
        run_phase(backbone, phase, settings)
        return PhasePlan(peak_bytes=live.peak, flops=live.flops.get("step", 0), regions=dict(live.peaks))


def base_bits(phase: str, settings: RunSettings) -> str:
    """The frozen base's quantization in a phase: training's (validation draws on the model as it trains),
    or generate's when sampling."""
    return settings.sampling_quantize if phase in SAMPLING_PHASES else settings.train.quantize


ESTIMATE_DEPTHS = (2, 3)  # transformer layers of the two cuts `estimate` measures (1 layer is not yet linear)


def estimate(model: str, phase: str, settings: RunSettings, resolution: int | None = None) -> PhasePlan:
    """`measure` at full depth, in seconds: measured on the model cut to 2 and 3 layers and extrapolated
    linearly to its depth, and with N > 2 micro-batches a step measured as 2 (the second and every later
    micro-batch start from the same state: the accumulated gradients; the FLOPs are scaled by N / 2). Equal to
    `measure` but for the few KB of the smaller batch's token ids (tests/test_plan.py). Each region of the
    phase (tracker.LiveBytes.peaks: the VQ encoder or decoder, the forward pass, the backward pass at the head
    and at the first and last layers, the optimizer step) is extrapolated on its own and the largest taken:
    the one that dominates 2 layers need not dominate 32."""
    t = settings.train
    scale = 1.0
    if phase not in SAMPLING_PHASES and t.gradient_accumulation_steps > 2:
        micro = t.batch_size // t.gradient_accumulation_steps
        scale = t.gradient_accumulation_steps / 2
        settings = replace(settings, train=replace(t, batch_size=2 * micro, gradient_accumulation_steps=2))
    depth, (d0, d1) = num_layers(model), ESTIMATE_DEPTHS
    if depth <= d1:  # small enough to measure whole
        whole = measure(model, phase, settings, resolution)
        return PhasePlan(peak_bytes=whole.peak_bytes, flops=int(whole.flops * scale), regions=whole.regions)
    a, b = (measure(model, phase, settings, resolution, layers=d) for d in (d0, d1))

    def extrapolated(x: int, y: int) -> int:
        return x + (y - x) * (depth - d0) // (d1 - d0)

    regions = {name: extrapolated(a.regions.get(name, 0), b.regions.get(name, 0))
               for name in {**a.regions, **b.regions}}
    return PhasePlan(peak_bytes=max(regions.values()), flops=int(extrapolated(a.flops, b.flops) * scale),
                     regions=regions)


def plan_memory(model: str, settings: RunSettings, resolution: int | None = None, sampling: bool = True,
                cache: dict | None = None, budget: int | None = None) -> Plan:
    """The peak of every phase the settings' run goes through (training stages, the validation pictures, then
    generate's sampling). `cache`: phase plans already estimated, by `phase_key` (fitting_settings shares
    one). `budget`: stop at the first phase that does not fit it, trying the later ones first (stage 2 holds
    what stage 1 holds and more). sampling: False leaves generate's phases out (the training search)."""
    phases = run_phases(settings, sampling)
    cache = {} if cache is None else cache
    plan = Plan(model, settings)
    for phase in phases if budget is None else reversed(phases):
        key = phase_key(phase, settings)
        if key not in cache:
            cache[key] = estimate(model, phase, settings, resolution)
        plan.phases[phase] = cache[key]
        if budget is not None and not plan.fits(budget):
            break
    plan.phases = {phase: plan.phases[phase] for phase in phases if phase in plan.phases}  # in the run's order
    return plan


def run_phases(settings: RunSettings, sampling: bool = True) -> list[str]:
    """The phases of the run, in its order: the stages, the validation pictures (where the run draws them),
    generate's sampling."""
    phases = [STAGE_PHASES[stage] for stage, _ in settings.train.plan]
    return phases + ([VALIDATION] if settings.validation_prompts else []) + (list(SAMPLING_PHASES) if sampling else [])


def phase_key(phase: str, settings: RunSettings) -> tuple:
    """What a phase's figures depend on among the settings `candidates` and `sampling_candidates` vary
    (stage 1 trains [V] alone: not the layers stage 2 trains, nor its optimizer; sampling: the base's bits
    and the batch; validation: the last stage's resident state, the prompts drawn at once)."""
    t = settings.train
    if phase in SAMPLING_PHASES:
        return (phase, settings.sampling_quantize, settings.num_images)
    if phase == VALIDATION:
        return (phase, t.stages, t.layers, t.optimizer, t.quantize, settings.validation_prompts)
    key = (phase, t.gradient_checkpointing, t.gradient_accumulation_steps, t.quantize)
    return key + ((t.layers, t.optimizer) if phase != "stage1" else ())


# --- settings that fit a budget -----------------------------------------------------------------------

# Relative step time of what the FLOP count does not see: a quantized weight is dequantized for every matrix
# product, forward and backward (torchtune reports QLoRA ~1.3x slower than LoRA in bf16; int8 weight-only
# dequantizes per row, cheaper), and a micro-batch adds a pass of overhead. Heuristics for the ordering only.
QUANTIZE_SLOWDOWN = {"none": 1.0, "int8": 1.15, "nf4": 1.3}
MICRO_BATCH_OVERHEAD = 0.02  # per extra micro-batch of a step
CHECKPOINTING_SLOWDOWN = 4 / 3  # one more forward pass per forward + backward (3 passes' worth)
MEMORY_ORDER = {"quantize": ("nf4", "int8", "none"), "optimizer": ("adamw8bit", "adamw"), "layers": ("lora", "qkv")}


def candidates(settings: RunSettings) -> list[RunSettings]:
    """The user's settings with each memory-versus-speed choice varied: gradient checkpointing, micro-batches
    with accumulation (the same pairs per step), 8-bit AdamW, a quantized base (with LoRA: QLoRA), LoRA in
    place of full Q/K/V. The other settings (steps, rates, batch size, resolution) stay the user's. Ordered
    by their expected speed, the user's own first. A choice whose library is not installed here (torchao,
    bitsandbytes: `unavailable_choices`) is not offered, unless it is the user's own."""
    train = settings.train
    missing = set(unavailable_choices())
    trains_layers = train.stages != "embedding"
    layer_options = [train.layers] + (["lora"] if train.layers == "qkv" and trains_layers else [])
    accumulations = [a for a in (1, 2, 4, 8, 16) if train.batch_size % a == 0]
    out = []
    for layers, ckpt, accum, optimizer, quantize in itertools.product(
            layer_options, (False, True), accumulations, ("adamw", "adamw8bit"), ("none", "int8", "nf4")):
        if quantize != "none" and layers != "lora" and trains_layers:
            continue  # full Q/K/V needs an unquantized base
        if optimizer == "adamw8bit" and (layers == "lora" or not trains_layers) and train.optimizer == "adamw":
            continue  # 8-bit moments of a few thousand LoRA (or [V]) weights save nothing
        if ({f"--optimizer {optimizer}", f"--quantize {quantize}"} & missing
                and (optimizer, quantize) != (train.optimizer, train.quantize)):
            continue  # it could not run here; the user's own choice is checked, and refused, as it is
        option = replace(settings, train=replace(train, layers=layers, gradient_checkpointing=ckpt, optimizer=optimizer,
                                                 gradient_accumulation_steps=accum, quantize=quantize))
        if all(_key(option) != _key(o) for o in out):
            out.append(option)
    return sorted(out, key=lambda o: (_key(o) != _key(settings), _expected_time(o)))


def unavailable_choices() -> list[str]:
    """The lean choices whose library cannot be imported here, as flags ("--optimizer adamw8bit")."""
    return [f"--{axis} {value}" for (axis, value), module in lean.LIBRARY.items() if not lean.can_import(module)]


def _key(s: RunSettings) -> tuple:
    return _choices(s) + (s.train.gradient_accumulation_steps,)


def _choices(s: RunSettings) -> tuple:
    """The choices `candidates` varies, but for the micro-batches."""
    t = s.train
    return (t.layers, t.gradient_checkpointing, t.optimizer, t.quantize)


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


def fitting_settings(model: str, settings: RunSettings, budget: int, resolution: int | None = None,
                     limit: int = 5, cache: dict | None = None) -> list[Plan]:
    """Up to `limit` variations of `settings` whose training phases fit `budget`, fastest first; sampling
    does not depend on them and is the caller's to check.

    Candidates are estimated in their expected speed order, each phase once (`cache`, shared with
    `plan_memory`'s), stage 2 first. One that is nowhere leaner than a setting found too large is not
    estimated at all, so each candidate's variant with the most micro-batches is tried before it: one miss
    rules out the others. If none of the leanest candidates fits (QLoRA with checkpointing and the most
    micro-batches; for Q/K/V also 8-bit AdamW with them), nothing else is tried."""
    cache = {} if cache is None else cache

    def fits(option: RunSettings) -> Plan | None:
        plan = plan_memory(model, option, resolution, sampling=False, cache=cache, budget=budget)
        return plan if plan.fits(budget) else None

    options = candidates(settings)
    leanest = [o for o in options if not any(_key(o) != _key(other) and _needs_more_memory(o, other)
                                              for other in options)]
    if not any(fits(o) for o in leanest):
        return []  # every candidate needs at least one of these' memory
    found, misses = [], []

    def missed(option: RunSettings) -> bool:
        return any(_needs_more_memory(option, miss) for miss in misses)

    for option in options:
        if missed(option):
            continue
        # The same choices with the most micro-batches first: if even that misses, none of them is tried.
        most = max((o for o in options if _choices(o) == _choices(option)),
                   key=lambda o: o.train.gradient_accumulation_steps)
        if most is not option and not missed(most) and not fits(most):
            misses.append(most)
            continue
        plan = fits(option)
        if plan:
            found.append(plan)
        else:
            misses.append(option)  # what needs more memory than this is not estimated either
        if len(found) == limit:
            break
    return sorted(found, key=relative_time)


# --- the whole run: generate's batch and bits as well -------------------------------------------------

SAMPLING_BITS_ORDER = ("none", "int8", "nf4")  # full precision first: a quantized base draws slightly other images


def sampling_candidates(settings: RunSettings) -> list[RunSettings]:
    """generate's choices for the adapter these settings train: the base's bits (the user's own, or the
    default generate picks, first; then full precision, int8, nf4, those the adapter can be drawn on and whose
    library is installed) and the batch (the user's, then halved down to 1). Ordered: bits first, then the
    largest batch (images per second grow with the batch; the bits change the pictures)."""
    own = settings.sampling_quantize
    missing = set(unavailable_choices())
    allowed = SAMPLING_BITS_ORDER if can_sample_quantized(settings.train) else ("none",)
    bits = [own] + [b for b in allowed if b != own and f"--quantize {b}" not in missing]
    batches, b = [], settings.num_images
    while b >= 1:
        batches.append(b)
        b //= 2
    return [replace(settings, sample_quantize=q, num_images=n) for q in bits for n in batches]


def sampling_fit(model: str, settings: RunSettings, budget: int, resolution: int | None = None,
                 cache: dict | None = None) -> Plan | None:
    """generate's phases at the first of `sampling_candidates` that fits `budget`, or None."""
    cache = {} if cache is None else cache
    for option in sampling_candidates(settings):
        plan = Plan(model, option)
        for phase in SAMPLING_PHASES:
            key = phase_key(phase, option)
            if key not in cache:
                cache[key] = estimate(model, phase, option, resolution)
            plan.phases[phase] = cache[key]
        if plan.fits(budget):
            return plan
    return None


def whole_run_fits(model: str, settings: RunSettings, budget: int, resolution: int | None = None,
                   limit: int = 5, cache: dict | None = None) -> list[Plan]:
    """Up to `limit` whole runs that fit `budget`, the fastest training first: each of `fitting_settings`'s
    training settings (stages and validation pictures) with the first of generate's settings that fits for
    the adapter it trains (`sampling_fit`). One plan per run, every phase in it."""
    cache = {} if cache is None else cache
    found = []
    for training in fitting_settings(model, settings, budget, resolution, limit=limit, cache=cache):
        sampling = sampling_fit(model, training.settings, budget, resolution, cache)
        if sampling is not None:
            whole = Plan(model, sampling.settings, {**training.phases, **sampling.phases})
            found.append(whole)
    return found


def closest_run(model: str, settings: RunSettings, resolution: int | None = None,
                cache: dict | None = None) -> Plan:
    """When nothing fits: the leanest whole run among the candidates (the least memory at its peak), every
    phase estimated: the setting to name, and the figure it needs."""
    cache = {} if cache is None else cache
    options = candidates(settings)
    leanest = [o for o in options if not any(_key(o) != _key(other) and _needs_more_memory(o, other)
                                              for other in options)]
    fewest_bits = {bits: rank for rank, bits in enumerate(reversed(SAMPLING_BITS_ORDER))}  # nf4 first
    best = None
    for option in leanest:
        smallest = min(sampling_candidates(option), key=lambda s: (fewest_bits[s.sampling_quantize], s.num_images))
        plan = plan_memory(model, smallest, resolution, cache=cache)
        if best is None or plan.peak_bytes < best.peak_bytes:
            best = plan
    return best


def describe_sampling(settings: RunSettings) -> str:
    """The `tokenbooth generate` flags that give these settings' sampling memory."""
    return f"--batch-size {settings.num_images} --quantize {settings.sampling_quantize}"


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


__all__ = ["Plan", "PhasePlan", "RunSettings", "plan_memory", "fitting_settings", "measure", "estimate",
           "parse_size", "describe", "relative_time", "candidates", "unavailable_choices", "sampling_candidates",
           "sampling_fit", "whole_run_fits", "closest_run", "describe_sampling", "run_phases"]
