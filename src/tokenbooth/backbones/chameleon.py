"""Chameleon-architecture backbones: Lumina-mGPT, and mini (a Lumina-mGPT in miniature).

This module is the one place that decides the Lumina-mGPT token layout (Alpha-VLLM/Lumina-mGPT,
`lumina_mgpt/data/item_processor.py` and `data/convertsation.py`):

    <s> Generate an image of {W}x{H} according to the following prompt:\n{prompt} <reserved08706>
    <racm3:break> <reserved{8800+H/g}> <reserved{8800+W/g}>
    (W/d image tokens <reserved08799>) x H/d rows
    <eoss> <reserved08706>

with d the VQGAN downsampling and g = 2d the size-token unit (Lumina-mGPT: d = 16, g = 32). The
unconditional prefix for classifier-free guidance is the image header alone, as Lumina-mGPT's CFG
processor builds it. A model folder holds the Hugging Face Chameleon checkpoint (config.json and
safetensors), tokenizer.json, the VQGAN in `vqgan/`, and `tokenbooth.json` with the fields of `ChameleonSpec`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..vq import VQGAN, load_vqgan
from .base import ImageLayout

IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
TURN_END = "<reserved08706>"  # Lumina-mGPT's conversation separator; generation stops at it
PROMPT_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"


def size_token(n_units: int) -> str:
    return f"<reserved{8800 + n_units:05d}>"


def image_token_name(code: int) -> str:
    """Chameleon spells codebook index 123 as IMGIMGBCDZ: digits become letters A-J."""
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


@dataclass
class ChameleonSpec:
    """What a Chameleon checkpoint does not say about itself: its image resolution and the size of the
    size-token unit (two VQ latents per side in Lumina-mGPT)."""

    resolution: int = 768
    size_unit: int = 32
    bos: str = "<s>"
    family: str = "lumina-mgpt"  # picks the personalization defaults (personalize/defaults.py)

    @staticmethod
    def read(folder: Path) -> "ChameleonSpec":
        path = folder / "tokenbooth.json"
        if not path.is_file():
            raise UserError(f"model file missing: {path}")
        fields = ChameleonSpec.__dataclass_fields__
        return ChameleonSpec(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})

    def write(self, folder: Path) -> None:
        from ..io import atomic_write_json

        atomic_write_json(folder / "tokenbooth.json", asdict(self))


class ChameleonBackbone:
    def __init__(self, name: str, model, tokenizer, vqgan: VQGAN, spec: ChameleonSpec, folder: Path | None = None):
        self.name, self.model, self.tokenizer, self.vqgan, self.spec = name, model, tokenizer, vqgan, spec
        self.folder = folder  # where the weights came from: adapters record its fingerprint
        self.family = spec.family
        self.resolution = spec.resolution
        self.max_length = model.config.max_position_embeddings
        self.layout = self._layout()

    # --- token layout ---

    def token_id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise UserError(f"{self.name}: tokenizer has no token {token!r}")
        return tid

    def _layout(self) -> ImageLayout:
        grid = self.resolution // self.vqgan.config.downsample
        units = self.resolution // self.spec.size_unit
        img2bpe = self.model.model.vocabulary_mapping.img2bpe
        if len(img2bpe) != self.vqgan.config.n_embed:
            raise UserError(f"{self.name}: vocabulary has {len(img2bpe)} image tokens but the VQGAN has "
                            f"{self.vqgan.config.n_embed} codes")
        image_token_ids = torch.tensor([img2bpe[c] for c in range(len(img2bpe))], dtype=torch.long)
        header = (self.token_id(IMAGE_START), self.token_id(size_token(units)), self.token_id(size_token(units)))
        return ImageLayout(header=header, rows=grid, cols=grid, row_end=self.token_id(ROW_END),
                           image_end=self.token_id(IMAGE_END), image_token_ids=image_token_ids)

    def prompt_text(self, prompt: str) -> str:
        return PROMPT_TEMPLATE.format(w=self.resolution, h=self.resolution, prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.encode(self.prompt_text(prompt), add_special_tokens=False).ids
        return [self.token_id(self.spec.bos), *text, self.token_id(TURN_END), *self.layout.header]

    def unconditional_ids(self) -> list[int]:
        return list(self.layout.header)

    def answer_end_ids(self) -> list[int]:
        """What follows the image block in a training sequence."""
        return [self.token_id(TURN_END)]

    # --- transformer ---

    def logits(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None):
        # transformers' ChameleonForConditionalGeneration.forward sets image-token logits to -inf (Chameleon
        # was released without image generation); Lumina-mGPT trains and samples with them, so we call the
        # base model and the LM head ourselves.
        out = self.model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=past_key_values is not None,
                               inputs_embeds=inputs_embeds)
        return self.model.lm_head(out.last_hidden_state).float(), out.past_key_values

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.model.embed_tokens

    def attention_layers(self) -> list:
        """The self-attention blocks whose q_proj/k_proj/v_proj personalization's stage 2 trains."""
        return [layer.self_attn for layer in self.model.model.layers]

    def placeholder_candidates(self) -> list[str]:
        """Reserved vocabulary entries free to become [V]: Chameleon's <reservedNNNNN> tokens below the
        range Lumina-mGPT uses for its layout (08706 and up)."""
        vocab = self.tokenizer.get_vocab()
        names = [t for t in vocab if t.startswith("<reserved") and t[9:14].isdigit() and int(t[9:14]) < 8700]
        return sorted(names, key=lambda t: int(t[9:14]))

    # --- images ---

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(pixels)

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(codes)


def load_chameleon(folder: Path, name: str | None = None, dtype=torch.float32) -> ChameleonBackbone:
    from safetensors import SafetensorError
    from tokenizers import Tokenizer
    from transformers import ChameleonForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    folder = Path(folder)
    for required in ("config.json", "tokenizer.json"):
        if not (folder / required).is_file():
            raise UserError(f"model file missing: {folder / required}")
    spec = ChameleonSpec.read(folder)
    try:
        model, info = ChameleonForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, local_files_only=True, output_loading_info=True)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load the transformer in {folder}: {first_line}") from None
    # from_pretrained fills missing weights with random ones and only warns; a model that silently draws
    # noise is worse than an error.
    missing = [k for k in info["missing_keys"] if ".vqmodel." not in k]
    if missing or info.get("mismatched_keys"):
        detail = missing[:2] or info["mismatched_keys"][:2]
        raise UserError(f"weights in {folder} do not match its config.json ({detail})")
    model.eval()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return ChameleonBackbone(name or folder.name, model, tokenizer, load_vqgan(folder / "vqgan"), spec, folder)


def save_chameleon(backbone: ChameleonBackbone, folder: Path) -> None:
    """Writes a model folder that `load_chameleon` reads back: the layout of a Hugging Face Chameleon
    checkpoint plus tokenizer.json, vqgan/ and tokenbooth.json."""
    from ..io import atomic_path
    from ..vq import save_vqgan

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder)
    with atomic_path(folder / "tokenizer.json") as tmp:
        backbone.tokenizer.save(str(tmp))
    save_vqgan(backbone.vqgan, folder / "vqgan")
    backbone.spec.write(folder)
