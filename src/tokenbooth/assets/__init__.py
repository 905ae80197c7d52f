"""Model folders and pictures that ship with the package. The scripts that made them live in `pretrain/`
(mini, toyCLIP, toyDINO, the attribute reader) and `toyworld/demo_subject.py` (the demo's reference pictures)."""

from pathlib import Path

HERE = Path(__file__).resolve().parent
MINI_DIR = HERE / "mini"  # mini: Chameleon checkpoint, tokenizer, tokenbooth.json, vqgan/
TOYCLIP_DIR = HERE / "toyclip"  # toyCLIP in transformers' CLIPModel format
TOYDINO_DIR = HERE / "toydino"  # toyDINO (self-supervised, DINO's role) in transformers' ViTModel format
READER_DIR = HERE / "reader"  # the attribute reader: toyworld attributes from pixels
DEMO_SUBJECT_DIR = HERE / "demo_subject"  # the demo robot's reference pictures
CONFIGS_DIR = HERE / "configs"  # the published models' config.json files, for `tokenbooth plan`
ACCELERATE_FSDP = HERE / "accelerate" / "fsdp.yaml"  # `accelerate launch` config for sharded stage 2
