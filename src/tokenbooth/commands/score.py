"""`tokenbooth score`: DINO, CLIP-I and CLIP-T of a folder of images against reference images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.score import SIDECAR, parse_metrics, score_folder
from ..personalize.placeholder import PLACEHOLDER


def add_metric_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dino", help="DINO ViT-S/16: a Hugging Face folder, dino_deitsmall16_pretrain.pth, or a Hub id "
                                  "in the local cache (default: facebook/dino-vits16); never downloaded")
    p.add_argument("--clip", help="CLIP ViT-B/32: a Hugging Face folder, OpenAI's ViT-B-32.pt, or a Hub id in the "
                                  "local cache (default: openai/clip-vit-base-patch32); never downloaded")
    p.add_argument("--placeholder", default=PLACEHOLDER, help="the subject's token in prompts; removed before "
                                                              f"CLIP-T (default: {PLACEHOLDER})")


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("score", help="DINO, CLIP-I and CLIP-T of a folder of images against reference images",
                              description="DINO, CLIP-I and CLIP-T of a folder of images against reference images. "
                                          "A folder `tokenbooth generate` wrote is scored on the images its "
                                          f"{SIDECAR} lists (not grid.png), with its prompt.")
    s.add_argument("--images", type=Path, required=True, help="folder of generated images")
    s.add_argument("--references", type=Path, required=True, help="folder of the subject's real images")
    s.add_argument("--prompt", help="CLIP-T: the prompt of every image")
    s.add_argument("--prompts", type=Path, help="CLIP-T: a .txt (one line per scored image, file-name order) or a "
                                                ".json {file name: prompt}")
    s.add_argument("--metrics", default="dino,clip-i,clip-t", help="which of dino, clip-i, clip-t (default: all)")
    s.add_argument("--output", type=Path, help="write per-image scores and the summary to this JSON file")
    add_metric_flags(s)
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    score_folder(args.images, args.references, parse_metrics(args.metrics), prompt=args.prompt,
                 prompts_file=args.prompts, dino=args.dino, clip=args.clip, placeholder=args.placeholder,
                 output=args.output)
