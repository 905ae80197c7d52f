"""`tokenbooth plan`: the peak GPU memory of each phase of a run, and given a budget the settings that fit,
fastest first. No weights are read: the model is built from its shipped configuration with fake tensors."""

from __future__ import annotations

import json
from dataclasses import asdict

from ..backbones.families import DEFAULT_MODEL
from ..errors import UserError
from ..personalize.config import TrainConfig, check_train_values
from ..plan import (RunSettings, describe, fitting_settings, parse_size, plan_memory, relative_time,
                    unavailable_choices)
from ..plan.blueprints import blueprint
from ..plan.tracker import ALLOCATOR_RESERVE, fake_run
from ..sampling import SamplingConfig

GB = 1e9


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="peak GPU memory of training and sampling, before downloading anything",
                              description="Peak GPU memory of each phase of a run (stage 1, stage 2, sampling with "
                                          "CFG, sampling with SJD), measured on fake tensors; with --gpu-memory, "
                                          "the settings that fit, fastest first.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"mini, lumina-mgpt-7b-512|768|1024, janus-pro-1b|7b, or a model folder with a config.json "
                        f"(default: {DEFAULT_MODEL})")
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
    s = p.add_argument_group("sampling (as `tokenbooth generate`)")
    s.add_argument("-n", "--num-images", type=int, default=4,
                   help="images drawn at once (generate's --batch-size; default: 4)")
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
    return RunSettings(train=train, sample=sample, num_images=args.num_images)


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
    fitting = fitting_settings(args.model, settings, budget, args.resolution, cache=cache) if budget is not None else []
    if budget is not None and not fitting:
        raise UserError(f"nothing fits {args.gpu_memory}: training with {describe(settings)} needs "
                        f"{plan.peak_bytes / GB:.1f} GB, and no leaner setting tried (checkpointing, micro-batches, "
                        f"8-bit AdamW, QLoRA) gets under {(budget - ALLOCATOR_RESERVE) / GB:.1f} GB")
    if args.json:
        out = plan.to_json(budget)
        out["budget_bytes"] = budget
        out["fitting"] = [{"flags": describe(p.settings), "peak_bytes": p.peak_bytes,
                           "phases": {k: {"peak_bytes": v.peak_bytes} for k, v in p.phases.items()}} for p in fitting]
        print(json.dumps(out, indent=2))
        return
    print(f"{args.model}: {describe(settings)}, {settings.num_images} image(s) per sampling batch "
          f"(CFG {settings.sample.cfg_scale:g}, SJD window {settings.sample.sjd_window})")
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
        print(f"training settings that fit {args.gpu_memory}, fastest first (step time relative to the first):")
        for p in fitting:
            print(f"  {p.peak_bytes / GB:6.2f} GB  x{relative_time(p) / fastest:4.2f}  {describe(p.settings)}")
