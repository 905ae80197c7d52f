"""`tokenbooth plan`: the peak GPU memory of each phase of a run (stage 1, stage 2, the validation pictures,
generate at its batch), and given a budget the settings under which the whole run fits, fastest first, or
the closest setting and what it needs. No weights are read: the model is built from its shipped
configuration with fake tensors."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..backbones.families import DEFAULT_MODEL
from ..errors import UserError
from ..personalize.config import TrainConfig, check_train_values
from ..backbones.quantize import QUANTIZE
from ..plan import (RunSettings, closest_run, describe, describe_sampling, parse_size, plan_memory, relative_time,
                    unavailable_choices, whole_run_fits)
from ..plan.blueprints import blueprint
from ..plan.phases import can_sample_quantized
from ..plan.tracker import ALLOCATOR_RESERVE, fake_run
from ..sampling import SamplingConfig

GB = 1e9


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="peak GPU memory of training and sampling, before downloading anything",
                              description="Peak GPU memory of each phase of a run (stage 1, stage 2, the "
                                          "validation pictures, generate's sampling with CFG and with SJD), "
                                          "measured on fake tensors; with --gpu-memory, the training and "
                                          "generate settings under which the whole run fits, fastest first.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"mini, lumina-mgpt-7b-512|768|1024, janus-pro-1b|7b, emu3-gen, or a model folder with a "
                        f"config.json (default: {DEFAULT_MODEL})")
    p.add_argument("--resolution", type=int, help="image size (Lumina-mGPT: the preset's by default)")
    p.add_argument("--gpu-memory", metavar="SIZE", help="the GPU's memory, e.g. 24GB or 80GiB")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    t = p.add_argument_group("training (as `tokenbooth train`)")
    t.add_argument("--stages", choices=["two-stage", "embedding", "joint"])
    t.add_argument("--layers", help="qkv (paper), lora, or regexes over parameter names")
    t.add_argument("--lora-rank", type=int)
    t.add_argument("--lora-every", type=int)
    t.add_argument("--batch-size", type=int, help="pairs per optimizer step (default: the backbone's)")
    t.add_argument("--gradient-accumulation-steps", type=int, help="split each step into this many micro-batches")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--quantize", help="frozen base in none, int8 or nf4 (default: none)")
    t.add_argument("--optimizer", help="adamw or adamw8bit (default: adamw)")
    t.add_argument("--validation-prompts", type=int, default=4, metavar="N",
                   help="validation prompts the run draws (train's --validation-prompt flags; 0: none; default: 4)")
    s = p.add_argument_group("sampling (as `tokenbooth generate`)")
    s.add_argument("-n", "--num-images", "--sample-batch-size", type=int, default=4,
                   help="images drawn at once (generate's --batch-size; default: 4)")
    s.add_argument("--sample-quantize", choices=QUANTIZE,
                   help="the base's bits when sampling (generate's --quantize; default: what generate picks for the "
                        "adapter: the training base's for [V] and LoRA, full precision after full Q/K/V)")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (1.0: no unconditional rows)")
    s.add_argument("--sjd-window", type=int, metavar="L", help="draft tokens per SJD pass")
    p.set_defaults(run=run)


def settings_from_args(args, family: str):
    given = {k: getattr(args, k) for k in ("stages", "layers", "lora_rank", "lora_every", "batch_size",
                                           "gradient_accumulation_steps", "quantize", "optimizer")
             if getattr(args, k) is not None}
    train = TrainConfig.for_family(family, class_name="dog", gradient_checkpointing=args.gradient_checkpointing,
                                   **given)
    check_train_values(asdict(train))
    sample = {"cfg_scale": args.cfg, "sjd_window": args.sjd_window}
    sample = SamplingConfig.for_family(family, **{k: v for k, v in sample.items() if v is not None})
    sample.validate()
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1 (got {args.num_images})")
    if args.validation_prompts < 0:
        raise UserError(f"--validation-prompts must be >= 0 (got {args.validation_prompts})")
    if args.sample_quantize not in (None, "none") and not can_sample_quantized(train):
        raise UserError(f"--sample-quantize {args.sample_quantize}: the adapter of --layers {train.layers} changes "
                        f"whole layer weights, which generate draws on the full-precision base only")
    return RunSettings(train=train, sample=sample, num_images=args.num_images, sample_quantize=args.sample_quantize,
                       validation_prompts=args.validation_prompts)


def run(args) -> None:
    budget = parse_size(args.gpu_memory) if args.gpu_memory is not None else None
    if budget is not None and budget <= ALLOCATOR_RESERVE:
        raise UserError(f"nothing fits {args.gpu_memory}: the CUDA context and the allocator's slack alone take about "
                        f"{ALLOCATOR_RESERVE / GB:.1f} GB")
    with fake_run():
        family = blueprint(args.model, resolution=args.resolution, layers=1).family  # checks the model, cheaply
    settings = settings_from_args(args, family)
    cache: dict = {}  # phase figures, shared: the user's own settings are the first candidate
    plan = plan_memory(args.model, settings, resolution=args.resolution, cache=cache)
    fitting = whole_run_fits(args.model, settings, budget, args.resolution, cache=cache) if budget is not None else []
    if budget is not None and not fitting:
        closest = closest_run(args.model, settings, args.resolution, cache=cache)
        raise UserError(f"nothing fits {args.gpu_memory}: the closest whole run, train {describe(closest.settings)} "
                        f"with {closest.settings.validation_prompts} validation prompt(s) then generate "
                        f"{describe_sampling(closest.settings)}, needs {closest.peak_bytes / GB:.1f} GB at its peak "
                        f"({peak_phase(closest)}), +{ALLOCATOR_RESERVE / GB:.1f} GB for the CUDA context")
    if args.json:
        out = plan.to_json(budget)
        out["budget_bytes"] = budget
        out["settings"] = {"train": describe(settings), "generate": describe_sampling(settings),
                           "validation_prompts": settings.validation_prompts}
        out["fitting"] = [{"flags": describe(p.settings), "generate_flags": describe_sampling(p.settings),
                           "peak_bytes": p.peak_bytes,
                           "phases": {k: {"peak_bytes": v.peak_bytes} for k, v in p.phases.items()}} for p in fitting]
        print(json.dumps(out, indent=2))
        return
    print(f"{args.model}: train {describe(settings)}, {settings.validation_prompts} validation prompt(s); generate "
          f"{describe_sampling(settings)} (CFG {settings.sample.cfg_scale:g}, SJD window {settings.sample.sjd_window})")
    for name, phase in plan.phases.items():
        print(f"  {name:<14} {phase.peak_bytes / GB:7.2f} GB")
    line = f"  {'peak':<14} {plan.peak_bytes / GB:7.2f} GB (+{ALLOCATOR_RESERVE / GB:.1f} GB for the CUDA context and allocator)"
    if budget is not None:
        line += f": {'fits' if plan.fits(budget) else 'does not fit'} {args.gpu_memory}"
    print(line)
    if budget is not None and (missing := unavailable_choices()):
        print(f"not tried, their library is not installed here: {', '.join(missing)} "
              f"(pip install 'tokenbooth[lean]')")
    if fitting:
        fastest = relative_time(fitting[0])
        print(f"whole runs that fit {args.gpu_memory}, fastest training first (step time relative to the first; "
              f"peak over every phase):")
        for p in fitting:
            print(f"  {p.peak_bytes / GB:6.2f} GB  x{relative_time(p) / fastest:4.2f}  train {describe(p.settings)}; "
                  f"generate {describe_sampling(p.settings)}")


def peak_phase(plan) -> str:
    """The phase at the plan's peak."""
    return max(plan.phases, key=lambda name: plan.phases[name].peak_bytes)
