"""Chameleon-architecture backbones: Lumina-mGPT, and mini (a Lumina-mGPT in miniature).

This module is the one place that decides the Lumina-mGPT token layout. Checked against Alpha-VLLM/Lumina-mGPT
(`lumina_mgpt/data/item_processor.py`, `data/convertsation.py`, `inference_solver.py`, `xllmx/data/
item_processor.py`):

    <s> Generate an image of {W}x{H} according to the following prompt:\n{prompt} <reserved08706>
    <racm3:break> <reserved{8800+H/g}> <reserved{8800+W/g}>
    (W/d image tokens <reserved08799>) x H/d rows
    <eoss> <reserved08706>

with d the VQGAN downsampling and g = 2d the size-token unit (Lumina-mGPT: d = 16, g = 32). <s> is the
tokenizer's BOS, prepended to the tokenized conversation; <reserved08706> ends every turn (vocabulary id 8710:
Lumina-mGPT generates until it, the image ends at <eoss> just before). The unconditional prefix for
classifier-free guidance is the image header alone (the CFG processor cuts the sequence at <racm3:break>).
Image tokens are the vocabulary's IMGIMG... entries; codebook index c is the entry whose name spells c with
letters (VocabTranslation.img2bpe in Chameleon's `inference/vocab.py`).

Two kinds of model folder load here:
- tokenbooth's own (mini, tests): the Hugging Face Chameleon checkpoint, tokenizer.json, vqgan/ and
  tokenbooth.json with the fields of `ChameleonSpec`;
- Lumina-mGPT as published on the Hub (Alpha-VLLM/Lumina-mGPT-7B-512/-768/-1024): config.json (model_type
  "chameleon", with the vocabulary map), bf16 model-0000N-of-00002.safetensors without the VQ model, the
  qk-norm weights stored per model-parallel shard ([1, 128] for 7B; transformers' class wants one row per
  head). Only the 768 repository carries the text tokenizer (tokenizer.json, tokenizer_config.json,
  special_tokens_map.json); Lumina-mGPT's own code loads it from there for every resolution, and so does
  tokenbooth when a folder has none. The resolution comes from the preset name, the folder's name or
  `--resolution`. Meta's VQGAN is not in any of these repositories: see `find_vqgan`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..errors import UserError
from ..io import atomic_path, atomic_write_json
from ..quiet import quiet_imports
from ..vq import VQGAN, load_vqgan, save_vqgan
from ..vq.taming import load_taming_vqgan
from .base import ImageLayout, ImageLogits, parameters_outside, require_token
from .families import family_defaults
from .hf import load_pretrained, read_config, read_tensors, use_float32_attention_on_cpu
from .hub import cached_file

IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
TURN_END = "<reserved08706>"  # Lumina-mGPT's conversation separator; generation stops at it
PROMPT_TEMPLATE = "Generate an image of {w}x{h} according to the following prompt:\n{prompt}"

# Names users can type for the published checkpoints: the Hub repository and the resolution each was
# fine-tuned at (Lumina-mGPT README, "Checkpoints").
PRESETS = {
    "lumina-mgpt-7b-512": ("Alpha-VLLM/Lumina-mGPT-7B-512", 512),
    "lumina-mgpt-7b-768": ("Alpha-VLLM/Lumina-mGPT-7B-768", 768),
    "lumina-mgpt-7b-1024": ("Alpha-VLLM/Lumina-mGPT-7B-1024", 1024),
}
TOKENIZER_REPO = "Alpha-VLLM/Lumina-mGPT-7B-768"  # FlexARItemProcessor's default tokenizer, for every size
LUMINA_SIZE_UNIT = 32  # pixels per size-token unit: FlexARItemProcessor.patch_size
VQGAN_ENV = "TOKENBOOTH_VQGAN"  # a folder with Chameleon's VQGAN, for model folders that hold none


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
    family: str = "lumina-mgpt"  # picks the training and sampling defaults (backbones/families.py)

    @staticmethod
    def read(folder: Path) -> "ChameleonSpec":
        path = folder / "tokenbooth.json"
        if not path.is_file():
            raise UserError(f"model file missing: {path}")
        fields = ChameleonSpec.__dataclass_fields__
        return ChameleonSpec(**{k: v for k, v in json.loads(path.read_text()).items() if k in fields})

    def write(self, folder: Path) -> None:
        atomic_write_json(folder / "tokenbooth.json", asdict(self))


class ChameleonBackbone(ImageLogits):
    def __init__(self, name: str, model, tokenizer, vqgan: VQGAN, spec: ChameleonSpec, folder: Path | None = None):
        self.name, self.model, self.tokenizer, self.spec = name, model, tokenizer, spec
        use_float32_attention_on_cpu(model)  # mini and Lumina-mGPT train under bf16 autocast
        self.folder = folder  # where the weights came from: adapters record its fingerprint
        self.device = model.model.embed_tokens.weight.device  # where inputs go (the first layer's device)
        self.vqgan = vqgan.to(self.device)
        self.family = spec.family
        self.resolution = spec.resolution
        self.max_length = model.config.max_position_embeddings
        self.layout = self._layout()
        self._image_rows = self.layout.image_token_ids.to(model.lm_head.weight.device)  # LM head rows, code order

    # --- token layout ---

    def token_id(self, token: str) -> int:
        return require_token(self.tokenizer, token, self.name)

    def _layout(self) -> ImageLayout:
        d, g, r = self.vqgan.config.downsample, self.spec.size_unit, self.resolution
        if r % g or r % d:
            raise UserError(f"{self.name}: resolution {r} is not a multiple of the size unit {g} and the VQGAN's "
                            f"downsampling {d}")
        img2bpe = self.model.model.vocabulary_mapping.img2bpe
        if len(img2bpe) != self.vqgan.config.n_embed:
            raise UserError(f"{self.name}: vocabulary has {len(img2bpe)} image tokens but the VQGAN has "
                            f"{self.vqgan.config.n_embed} codes")
        if self.tokenizer.token_to_id(image_token_name(0)) != img2bpe[0]:
            raise UserError(f"{self.name}: the text tokenizer does not belong to this checkpoint (its "
                            f"{image_token_name(0)} is not the model's image token 0)")
        image_token_ids = torch.tensor([img2bpe[c] for c in range(len(img2bpe))], dtype=torch.long)
        header = (self.token_id(IMAGE_START), self.token_id(size_token(r // g)), self.token_id(size_token(r // g)))
        return ImageLayout(header=header, rows=r // d, cols=r // d, row_end=self.token_id(ROW_END),
                           image_end=self.token_id(IMAGE_END), image_token_ids=image_token_ids,
                           trailer=(self.token_id(TURN_END),))

    def prompt_text(self, prompt: str) -> str:
        return PROMPT_TEMPLATE.format(w=self.resolution, h=self.resolution, prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.encode(self.prompt_text(prompt), add_special_tokens=False).ids
        return [self.token_id(self.spec.bos), *text, self.token_id(TURN_END), *self.layout.header]

    def unconditional_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        return list(self.layout.header)

    # --- transformer ---
    # transformers' ChameleonForConditionalGeneration.forward sets image-token logits to -inf (Chameleon was
    # released without image generation); Lumina-mGPT trains (--unmask_image_logits) and samples with them,
    # so we call the base model and the LM head ourselves.

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        out = self.model.model(input_ids=to(input_ids), inputs_embeds=inputs_embeds, attention_mask=to(attention_mask),
                               position_ids=to(position_ids), cache=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's image rows only, in codebook order: 8,192 of Lumina-mGPT's 65,536 columns."""
        rows = self.model.lm_head.weight[self._image_rows]
        return F.linear(hidden, rows.to(hidden.dtype)).float()

    def vocabulary_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every column of the LM head, text tokens included: what mini's pre-training learns to predict
        (Chameleon only; personalization and sampling use `image_head`)."""
        return self.model.lm_head(hidden).float()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Everything but the VQ model (which transformers' Chameleon carries inside the language model)."""
        return parameters_outside(self.model, self.model.model.vqmodel)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids (text and image tokens share one table here)."""
        return self.model.model.embed_tokens(ids.to(self.device))

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.model.embed_tokens

    def decoder_layers(self) -> list[torch.nn.Module]:
        return decoder_layers(self.model)

    def attention_layers(self) -> list:
        """The self-attention blocks whose q_proj/k_proj/v_proj personalization's stage 2 trains."""
        return [layer.self_attn for layer in self.decoder_layers()]

    def placeholder_candidates(self) -> list[str]:
        """Reserved vocabulary entries free to become [V]: Chameleon's <reservedNNNNN> tokens below the
        range Lumina-mGPT uses for its layout (08706 and up)."""
        vocab = self.tokenizer.get_vocab()
        names = [t for t in vocab if t.startswith("<reserved") and t[9:14].isdigit() and int(t[9:14]) < 8700]
        return sorted(names, key=lambda t: int(t[9:14]))

    # --- images ---

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vqgan.encode(pixels.to(self.device)).cpu()

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        return self.vqgan.decode(codes.to(self.device)).float().cpu()


# --- loading --------------------------------------------------------------------------------------------

def decoder_layers(model) -> list[torch.nn.Module]:
    """A transformers Chameleon model's decoder layers (`ChameleonBackbone.decoder_layers`; the loader needs
    them before the backbone exists, to quantize them)."""
    return list(model.model.layers)


def load_chameleon(folder: Path, name: str | None = None, dtype=None, resolution: int | None = None,
                   device: str | None = None, quantize: str = "none") -> ChameleonBackbone:
    """A tokenbooth Chameleon folder, or Lumina-mGPT's as published (see the module docstring)."""
    with quiet_imports():  # here, not at the top: the model classes take seconds to import, `--help` none
        from transformers import ChameleonForConditionalGeneration

    folder = Path(folder)
    read_config(folder)
    tokenizer_path = text_tokenizer_path(folder)
    if (folder / "tokenbooth.json").is_file():
        spec = ChameleonSpec.read(folder)
    else:
        spec = ChameleonSpec(resolution=published_resolution(folder, name, resolution), size_unit=LUMINA_SIZE_UNIT,
                             bos=bos_token(tokenizer_path.parent), family="lumina-mgpt")
    if resolution is not None:
        spec.resolution = resolution
    weights_dtype = family_defaults(spec.family).weights_dtype
    dtype = dtype or (weights_dtype and getattr(torch, weights_dtype))
    vqgan = find_vqgan(folder)
    model, reshaped = load_pretrained(ChameleonForConditionalGeneration, folder, dtype=dtype, device=device,
                                      optional=(".vqmodel.",),  # Lumina-mGPT deletes the VQ model before saving
                                      accept_mismatch=_is_sharded_qk_norm, quantize=quantize,
                                      decoder_layers=decoder_layers)
    if reshaped:
        _expand_sharded_qk_norms(model, folder, reshaped)
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises its own Exception type for unreadable files
        raise UserError(f"cannot read the text tokenizer {tokenizer_path}: {e}") from None
    return ChameleonBackbone(name or folder.name, model, tokenizer, vqgan, spec, folder)


def published_resolution(folder: Path, name: str | None, resolution: int | None) -> int:
    if resolution is not None:
        return resolution
    if name in PRESETS:
        return PRESETS[name][1]
    found = re.search(r"lumina-mgpt-7b-(512|768|1024)(?![0-9])", str(folder.resolve()).lower())
    if found:
        return int(found.group(1))
    raise UserError(f"{folder} has no tokenbooth.json and its name does not say its resolution: pass --resolution "
                    f"(512, 768 or 1024 for Lumina-mGPT)")


def text_tokenizer_path(folder: Path) -> Path:
    if (folder / "tokenizer.json").is_file():
        return folder / "tokenizer.json"
    cached = cached_file(TOKENIZER_REPO, "tokenizer.json")
    if cached is not None:
        return cached
    raise UserError(f"text tokenizer missing: {folder / 'tokenizer.json'} (Lumina-mGPT-7B-512 and -1024 ship "
                    f"without one; tokenbooth then uses {TOKENIZER_REPO}'s from the Hugging Face cache)")


def bos_token(folder: Path) -> str:
    """The BOS that xllmx's Tokenizer.encode(bos=True) prepends: special_tokens_map.json's (or
    tokenizer_config.json's) bos_token, "<s>" for Chameleon."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            bos = json.loads(path.read_text()).get("bos_token")
            if isinstance(bos, dict):
                bos = bos.get("content")
            if isinstance(bos, str) and bos:
                return bos
    return "<s>"


def vqgan_folders(folder: Path) -> list[Path]:
    """Where Chameleon's VQGAN may be, in order: the model folder's vqgan/, $TOKENBOOTH_VQGAN, and
    ~/.cache/tokenbooth/chameleon-vqgan (a cached Hub snapshot is no place to add files)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "tokenbooth" / "chameleon-vqgan"
    env = [Path(os.environ[VQGAN_ENV]).expanduser()] if os.environ.get(VQGAN_ENV) else []
    return [folder / "vqgan", *env, cache]


def find_vqgan(folder: Path) -> VQGAN:
    """Either format in the first folder that has one: vqgan.json + vqgan.safetensors (tokenbooth's, see
    `tokenbooth convert vqgan`), or vqgan.yaml + vqgan.ckpt as Meta's Chameleon release ships them."""
    places = vqgan_folders(folder)
    for place in places:
        if (place / "vqgan.json").is_file() or (place / "vqgan.safetensors").is_file():
            return load_vqgan(place)
        if (place / "vqgan.yaml").is_file() or (place / "vqgan.ckpt").is_file():
            return load_taming_vqgan(place / "vqgan.yaml", place / "vqgan.ckpt")
    raise UserError(f"Chameleon VQGAN missing: put vqgan.yaml + vqgan.ckpt from Meta's Chameleon release "
                    f"(tokenizer/) in {places[0]}, in ${VQGAN_ENV} or in {places[-1]}")


def _is_sharded_qk_norm(name: str, in_file, in_model) -> bool:
    """Lumina-mGPT stores q_norm/k_norm as [model_parallel_size, head_dim] and repeats each row over the heads
    of its shard at run time (ChameleonLayerNorm.repeat_param); transformers' class holds one row per head."""
    return (name.endswith(("q_norm.weight", "q_norm.bias", "k_norm.weight", "k_norm.bias")) and len(in_file) == 2
            and len(in_model) == 2 and in_file[1] == in_model[1] and in_model[0] % in_file[0] == 0)


def _expand_sharded_qk_norms(model, folder: Path, reshaped: list) -> None:
    stored = read_tensors(folder, [name for name, _, _ in reshaped])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, in_file, in_model in reshaped:
            rows = stored[name].repeat_interleave(in_model[0] // in_file[0], dim=0)
            params[name].copy_(rows.to(params[name].dtype))


def save_chameleon(backbone: ChameleonBackbone, folder: Path) -> None:
    """Writes a model folder that `load_chameleon` reads back: the layout of a Hugging Face Chameleon
    checkpoint plus tokenizer.json, vqgan/ and tokenbooth.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder)
    with atomic_path(folder / "tokenizer.json") as tmp:
        backbone.tokenizer.save(str(tmp))
    save_vqgan(backbone.vqgan, folder / "vqgan")
    backbone.spec.write(folder)
