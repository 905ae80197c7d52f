"""The `tokenbooth` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import UserError


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (paper: 4.0)")
    p.add_argument("--top-k", type=int, default=2000, help="image top-k (paper: 2000; clipped to the codebook)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step (slow)")
    p.add_argument("--sampler", choices=("plain", "sjd"), default="plain",
                   help="sjd: speculative Jacobi decoding, the same images in fewer forward passes")
    p.add_argument("--sjd-window", type=int, metavar="L", help="draft tokens per SJD pass (default 16, the paper's)")
    p.add_argument("--sjd-init", metavar="{random,above}",
                   help="how SJD fills new draft positions: the token one row above (default) or a random one")
    p.add_argument("--sjd-coupling", metavar="{none,maximal,gumbel}",
                   help="how SJD re-draws drafts it has not verified yet: coupled with the old draft (maximal, the "
                        "default, or gumbel; MC-SJD) or independently (none); the same images either way")


MODEL_HELP = "mini, lumina-mgpt-7b-512|768|1024, janus-pro-1b|7b (from the Hugging Face cache), or a model folder"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tokenbooth", description="Personalize auto-regressive text-to-image models.")
    ap.add_argument("--version", action="version", version=f"tokenbooth {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="draw images from a text prompt")
    g.add_argument("prompt")
    g.add_argument("--model", default="mini", help=MODEL_HELP)
    _add_backbone_flags(g)
    g.add_argument("-n", "--num-images", type=int, default=4, help="images to draw in one batch")
    g.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    g.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    g.add_argument("--adapter", type=Path, help="an adapter folder written by `tokenbooth train`")
    _add_sampling_flags(g)

    t = sub.add_parser("train", help="personalize a model on 3-5 images of a subject (two-stage recipe)")
    t.add_argument("--model", default="mini", help=MODEL_HELP)
    _add_backbone_flags(t)
    t.add_argument("--images", type=Path, required=True, help="folder with the subject's images")
    t.add_argument("--class-name", help="the subject's class word, e.g. dog")
    t.add_argument("--no-class-name", action="store_true", help="prompts with [V] alone (the paper's ablation)")
    t.add_argument("--output", type=Path, required=True, help="adapter folder to write")
    t.add_argument("--resume", nargs="?", const="latest", help="continue the run in --output ('latest' or OUT)")
    _add_train_flags(t)

    d = sub.add_parser("demo", help="personalize mini on a bundled toy subject and draw a comparison grid")
    d.add_argument("--out", type=Path, default=Path("out/demo"))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true")

    c = sub.add_parser("convert", help="convert released weights to tokenbooth's files once")
    _add_convert_flags(c)

    s = sub.add_parser("score", help="DINO, CLIP-I and CLIP-T of a folder of images against reference images")
    _add_score_flags(s)
    e = sub.add_parser("eval", help="benchmarks: dreambench, toybench")
    benchmarks = e.add_subparsers(dest="benchmark", required=True)
    _add_dreambench_flags(benchmarks.add_parser("dreambench",
                                                help="personalize, draw and score every DreamBench subject"))
    tb = benchmarks.add_parser("toybench", help="the paper's experiment on mini: ceiling, floor and ablations")
    tb.add_argument("--output", type=Path, default=Path("runs/toybench"))
    tb.add_argument("--subjects", type=int, default=10, help="reserved toyworld subjects to teach")
    tb.add_argument("--clip", type=Path, help="CLIP for the metrics (default: the bundled toyCLIP)")
    tb.add_argument("--seed", type=int, default=0)
    return ap


def _add_metric_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dino", help="DINO ViT-S/16: a Hugging Face folder, dino_deitsmall16_pretrain.pth, or a Hub id "
                                  "in the local cache (default facebook/dino-vits16); never downloaded")
    p.add_argument("--clip", help="CLIP ViT-B/32: a Hugging Face folder, OpenAI's ViT-B-32.pt, or a Hub id in the "
                                  "local cache (default openai/clip-vit-base-patch32); never downloaded")
    p.add_argument("--placeholder", default="[V]", help="the subject's token in prompts; removed before CLIP-T")


def _add_score_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--images", type=Path, required=True, help="folder of generated images")
    s.add_argument("--references", type=Path, required=True, help="folder of the subject's real images")
    s.add_argument("--prompt", help="CLIP-T: the prompt of every image")
    s.add_argument("--prompts", type=Path, help="CLIP-T: a .txt (one line per image, file-name order) or a .json "
                                                "{file name: prompt}")
    s.add_argument("--metrics", default="dino,clip-i,clip-t", help="which of dino, clip-i, clip-t")
    s.add_argument("--output", type=Path, help="write per-image scores and the summary to this JSON file")
    _add_metric_flags(s)


def _add_dreambench_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--data", type=Path, required=True,
                   help="DreamBench's dataset/ folder (github.com/google/dreambooth)")
    b.add_argument("--model", default="mini", help="backbone: a name (mini) or a model folder")
    b.add_argument("--output", type=Path, required=True, help="run folder; a finished subject in it is skipped")
    b.add_argument("--subjects", help="comma-separated subset, e.g. dog,cat,backpack")
    b.add_argument("--images-per-prompt", type=int, default=1, help="the paper: 1; DreamBooth: 4")
    b.add_argument("--protocol", choices=("paper", "all-pairs"), default="paper",
                   help="paper: mean per image, per subject, then over subjects; all-pairs: DreamBooth's pooled mean")
    b.add_argument("--seed", type=int, default=0, help="prompt i is drawn with seed + i; training uses seed")
    b.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (paper: 4.0)")
    b.add_argument("--top-k", type=int, default=2000, help="image top-k (paper: 2000)")
    for name in ("stage1-steps", "stage2-steps", "batch-size"):
        b.add_argument(f"--{name}", type=int, help="default: the backbone's (personalize/defaults.py)")
    _add_metric_flags(b)


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    from .personalize import TrainConfig

    d = TrainConfig(class_name=None)
    t.add_argument("--placeholder", default=d.placeholder, help="the string prompts use for the subject")
    t.add_argument("--init-token", help="start [V] from this word's embedding (default: random, as the paper)")
    t.add_argument("--stages", default=d.stages, choices=["two-stage", "embedding", "joint"])
    t.add_argument("--layers", default=d.layers,
                   help="stage-2 targets: qkv (paper), lora, or comma-separated regexes over parameter names")
    t.add_argument("--lora-rank", type=int, default=d.lora_rank)
    t.add_argument("--lora-every", type=int, default=d.lora_every, help="LoRA on every N-th layer")
    for name in ("stage1-steps", "stage2-steps", "batch-size"):
        t.add_argument(f"--{name}", type=int, help="default: the backbone's (personalize/defaults.py)")
    for name in ("stage1-lr", "stage2-lr"):
        t.add_argument(f"--{name}", type=float, help="default: the backbone's (personalize/defaults.py)")
    t.add_argument("--flip", action="store_true", help="add mirrored copies of the images")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps)
    t.add_argument("--prior-preservation", action="store_true", help="DreamBooth's class-prior loss")
    t.add_argument("--num-class-images", type=int, default=d.num_class_images)
    t.add_argument("--prior-loss-weight", type=float, default=d.prior_loss_weight)
    t.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts")
    t.add_argument("--validation-steps", type=int, default=d.validation_steps)
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less GPU memory, slower steps")


def _add_backbone_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", type=int, help="image size of a Lumina-mGPT folder whose name does not say it")
    p.add_argument("--device", help="cpu, cuda, cuda:N, or auto (layers spread over all GPUs); default: cuda if "
                                    "there is one")


def _add_convert_flags(c: argparse.ArgumentParser) -> None:
    what = c.add_subparsers(dest="what", required=True)
    v = what.add_parser("vqgan", help="Meta's Chameleon vqgan.yaml + vqgan.ckpt -> vqgan.json + vqgan.safetensors")
    v.add_argument("--config", type=Path, required=True, help="vqgan.yaml from Chameleon's tokenizer/ folder")
    v.add_argument("--ckpt", type=Path, required=True, help="vqgan.ckpt from Chameleon's tokenizer/ folder")
    v.add_argument("--out", type=Path, required=True,
                   help="folder to write; tokenbooth looks in MODEL/vqgan and $TOKENBOOTH_VQGAN (docs/gpu.md)")


def cmd_generate(args) -> None:
    from .generate import run_generate

    run_generate(args)


def cmd_train(args) -> None:
    from .personalize.run import run_train

    run_train(args)


def cmd_demo(args) -> None:
    from .personalize.demo import run_demo

    run_demo(args)


def cmd_convert(args) -> None:
    from .vq.taming import convert_vqgan

    convert_vqgan(args.config, args.ckpt, args.out)


def cmd_score(args) -> None:
    from .eval.score import run_score

    run_score(args)


def cmd_eval(args) -> None:
    if args.benchmark == "dreambench":
        from .eval.dreambench import run_dreambench

        run_dreambench(args)
    elif args.benchmark == "toybench":
        from .eval.toybench import run_toybench

        run_toybench(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_flush_denormal(True)  # denormals slow CPU kernels down many times over
    try:
        {"generate": cmd_generate, "train": cmd_train, "demo": cmd_demo, "score": cmd_score, "convert": cmd_convert,
         "eval": cmd_eval}[args.command](args)
    except UserError as e:
        print(f"tokenbooth: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokenbooth: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
