"""`tokenbooth convert vqgan`: released weights to tokenbooth's files, once."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    c = subparsers.add_parser("convert", help="convert released weights to tokenbooth's files once",
                              description="Convert released weights to tokenbooth's files once.")
    what = c.add_subparsers(dest="what", required=True, metavar="{vqgan}")
    v = what.add_parser("vqgan", help="Meta's Chameleon vqgan.yaml + vqgan.ckpt -> vqgan.json + vqgan.safetensors",
                        description="Meta's Chameleon vqgan.yaml + vqgan.ckpt -> vqgan.json + vqgan.safetensors, "
                                    "refused key by key when the two do not match.")
    v.add_argument("--config", type=Path, required=True, help="vqgan.yaml from Chameleon's tokenizer/ folder")
    v.add_argument("--ckpt", type=Path, required=True, help="vqgan.ckpt from Chameleon's tokenizer/ folder")
    v.add_argument("--out", type=Path, required=True,
                   help="folder to write; tokenbooth looks in MODEL/vqgan and $TOKENBOOTH_VQGAN (docs/gpu.md)")
    v.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from ..io import check_can_create
    from ..vq.taming import convert_vqgan

    check_can_create(args.out, "--out folder", folder=True)
    convert_vqgan(args.config, args.ckpt, args.out)
