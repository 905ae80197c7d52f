"""Emu3 (BAAI): one Llama-style transformer over text and image tokens, images from a VQ-VAE with 32,768 codes.

Loaded from the Hub folder in transformers' Emu3 format (BAAI/Emu3-Gen-hf, written by transformers'
`convert_emu3_weights_to_hf.py`: config.json with model_type "emu3" and the tokenizer's vocabulary as
`vocabulary_map`, the VQ-VAE inside the checkpoint as `model.vqmodel.*`, tokenizer.json, and the processor's
files). This module is the one place that decides Emu3's layout, read from transformers' Emu3 sources
(`models/emu3/processing_emu3.py`, `modeling_emu3.py`) and checked against BAAI's (baaivision/Emu3:
`emu3/mllm/processing_emu3.py`, `emu3/mllm/utils_emu3.py`, `emu3/train/datasets.py`, README "Quickstart"):

    <|extra_203|>{prompt}<|image start|>{h}*{w}<|image token|>
    (w image tokens <|extra_200|>) x h rows
    <|extra_201|><|image end|>

- BOS is the tokenizer's bos_token (<|extra_203|>), written as text before the prompt (the processor's
  `prepare_inputs_layout`); the image-size prefix "{h}*{w}" counts VQ latents (pixels / 8) and goes through
  the text tokenizer (`Emu3Processor.__call__` with return_for_image_generation, `calculate_generate_size`).
- Every row ends with <|extra_200|> (eol, `Emu3ImageVocabularyMapping.convert_img2bpe`; BAAI's
  `Emu3PrefixConstrainedLogitsHelper` forces it at every offset that is a multiple of w + 1), the image with
  <|extra_201|> (eof) and then <|image end|> (eoi). The sampler's body ends at eof; a training sequence ends
  with eoi, as BAAI's `Emu3FeatureDataset.format_image_prompt` writes it (the layout's trailer).
- Image tokens are the vocabulary's "<|visual token NNNNNN|>" entries; codebook index c is the entry that
  spells c (`Emu3ImageVocabularyMapping.img2bpe`). The LM head scores the whole vocabulary; `image_head`
  multiplies only the image rows, in codebook order (the training loss is BAAI's `apply_loss_on_only_vision`
  restricted to what the sampler can draw).
- Classifier-free guidance as BAAI samples: the unconditional row is the negative prompt in the same
  template, image prefix included (`processor(text=NEGATIVE_PROMPT, mode='G')` in BAAI's README; the
  negative prompt lives in the family table, backbones/families.py).
- The VQ-VAE encodes a still image as 4 repeated frames (`Emu3VQVAE.encode`) and decodes its first frame;
  pixels are normalized as the processor's image_mean / image_std say (0.5 / 0.5 for Emu3: [-1, 1]). It
  runs in float32, so its nearest-code search does not round in bf16.
- The dropout of Emu3's config (attention_dropout 0.1, also on each layer's residual branches) is switched
  off: personalization trains without dropout.
- [V] takes a reserved token the tokenizer already has and Emu3 never uses: <|extra_1|> and on
  (<|extra_0|> is transformers' <image> placeholder; 200, 201, 203, 204 are the layout's and the ends').

BAAI's original release (BAAI/Emu3-Gen: model_type "Emu3", remote code, a tiktoken vocabulary and the
VQ-VAE in another repository) is not this format; it is refused with a pointer to the -hf folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer

from ..errors import UserError
from ..quiet import quiet_imports
from .base import ImageLayout, ImageLogits, parameters_outside, require_token
from .families import family_defaults
from .hf import load_pretrained, read_config, require

# Names users can type: the Hub repository and the resolution it draws by default. Emu3-Gen draws any size its
# context holds; 720 x 720 is the processor's default image_area, 518,400 pixels (transformers'
# Emu3Processor.image_area, BAAI's `Emu3Config.image_area` and its SFT script's --image_area).
PRESETS = {"emu3-gen": ("BAAI/Emu3-Gen-hf", 720)}
FAMILY = "emu3"
BOS = "<|extra_203|>"  # tokenizer bos_token (convert_emu3_weights_to_hf.py)
IMAGE_START = "<|image start|>"  # boi_token
IMAGE_WRAPPER = "<|image token|>"  # image_wrapper_token: the header's last token, before the first row
ROW_END = "<|extra_200|>"  # eol
FRAME_END = "<|extra_201|>"  # eof: the body's last token
IMAGE_END = "<|image end|>"  # eoi: what a training sequence holds after eof
SIZE_PREFIX = "{h}*{w}"  # latents high * latents wide, as text
VISUAL_TOKEN = "<|visual token {:06d}|>"
ORIGINAL_MODEL_TYPE = "Emu3"  # BAAI's remote-code config.json
LAYOUT_EXTRAS = {0, 200, 201, 202, 203, 204}  # <|extra_N|> tokens Emu3 or transformers give a meaning
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # transformers 5 writes the first


class Emu3Backbone(ImageLogits):
    family = FAMILY

    def __init__(self, name: str, model, tokenizer, resolution: int, normalization: tuple,
                 folder: Path | None = None):
        self.name, self.model, self.tokenizer, self.folder = name, model, tokenizer, folder
        self.text = model.model.text_model  # Emu3TextModel: embed_tokens, layers, norm
        self.vq = model.model.vqmodel
        self.device = self.text.embed_tokens.weight.device
        self.mean, self.std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in normalization)
        self.max_length = model.config.text_config.max_position_embeddings
        self.resolution = check_resolution(resolution, vq_factor(model.config.vq_config), self.max_length, name)
        img2bpe = model.model.vocabulary_mapping.img2bpe  # codebook index -> vocabulary id
        image_ids = [img2bpe[c] for c in range(len(img2bpe))]
        self.layout = self._layout(image_ids)
        self._image_rows = image_rows(image_ids, model.lm_head.weight.device)
        for layer in self.decoder_layers():
            # Emu3's config keeps BAAI's pretraining dropout (attention_dropout 0.1: on the attention weights and
            # on both residual branches of every layer), which acts in training mode only, and gradient
            # checkpointing puts the layers in training mode: personalization trains without dropout, as on the
            # other families, so a step is the same with checkpointing or without.
            layer.self_attn.attention_dropout = 0.0
            layer.dropout.p = 0.0

    def _id(self, token: str) -> int:
        return require_token(self.tokenizer, token, self.name)

    # --- token layout ---

    def _layout(self, image_ids: list[int]) -> ImageLayout:
        codes = self.vq.config.codebook_size
        if len(image_ids) != codes:
            raise UserError(f"{self.name}: vocabulary has {len(image_ids)} visual tokens but the VQ model has {codes} "
                            f"codes")
        if self.tokenizer.token_to_id(VISUAL_TOKEN.format(0)) != image_ids[0]:
            raise UserError(f"{self.name}: the text tokenizer does not belong to this checkpoint (its "
                            f"{VISUAL_TOKEN.format(0)} is not the model's image token 0)")
        side = self.resolution // vq_factor(self.vq.config)
        size = self.tokenizer.encode(SIZE_PREFIX.format(h=side, w=side), add_special_tokens=False).ids
        header = (self._id(IMAGE_START), *size, self._id(IMAGE_WRAPPER))
        return ImageLayout(header=header, rows=side, cols=side, row_end=self._id(ROW_END),
                           image_end=self._id(FRAME_END), trailer=(self._id(IMAGE_END),),
                           image_token_ids=torch.tensor(image_ids, dtype=torch.long))

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self._id(BOS), *self.tokenizer.encode(prompt, add_special_tokens=False).ids, *self.layout.header]

    def unconditional_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """The negative prompt in the prompt's template (BAAI's README samples with it)."""
        return Emu3Backbone.prompt_ids(self, family_defaults(FAMILY).negative_prompt or "")

    # --- transformer ---

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        out = self.text(input_ids=to(input_ids), inputs_embeds=inputs_embeds, attention_mask=to(attention_mask),
                        position_ids=to(position_ids), cache=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's 32,768 visual-token rows, in codebook order (of its 184,622)."""
        rows = self.model.lm_head.weight[self._image_rows]  # a view when the rows are contiguous, as in Emu3
        return F.linear(hidden, rows.to(hidden.dtype)).float()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The language model (embeddings, layers, LM head); never the VQ-VAE."""
        return parameters_outside(self.model, self.vq)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed_tokens(ids.to(self.device))

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.text.embed_tokens

    def decoder_layers(self) -> list[torch.nn.Module]:
        return decoder_layers(self.model)

    def attention_layers(self) -> list:
        return [layer.self_attn for layer in self.decoder_layers()]

    def placeholder_candidates(self) -> list[str]:
        """<|extra_1|>, <|extra_2|>, ...: reserved tokens with embedding rows that no layout uses."""
        rows = self.text.embed_tokens.num_embeddings
        names = [f"<|extra_{i}|>" for i in range(205) if i not in LAYOUT_EXTRAS]
        return [t for t in names if (tid := self.tokenizer.token_to_id(t)) is not None and tid < rows]

    # --- images ---

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Emu3VQVAE.encode on the pixels normalized as the processor does (`encode_still`)."""
        weight = self.vq.quantize.embedding.weight
        normalized = ((pixels.float() + 1) / 2 - self.mean) / self.std
        return encode_still(self.vq, normalized.to(weight.device, weight.dtype)).long().cpu()

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Emu3VQVAE.decode's first frame (`decode_first_frame`), un-normalized as the processor's postprocess
        does, to [-1, 1]."""
        out = decode_first_frame(self.vq, codes.to(self.vq.quantize.embedding.weight.device)).float().cpu()
        return ((out * self.std + self.mean) * 2 - 1).clamp(-1, 1)


# Emu3's VQ-VAE is a video tokenizer: `Emu3VQVAE.encode` repeats a still image over 4 frames and runs the
# spatial encoder on each, `decode` decodes 4 frames and a still image is the first. The spatial encoder and
# decoder treat frames one by one (2-D layers over batch x frames); only the temporal layers, on 4-channel
# latents, mix frames. So the spatial encoder runs once on the image and its output is repeated, and the spatial
# decoder runs on the first frame alone: the same codes and pixels (tests/test_emu3_equivalence.py) at a quarter
# of the full-resolution activations, 21.7 -> 5.4 GB in fp32 at 720 px (`tokenbooth plan`).

def encode_still(vq, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalized pixels -> (B, H/8, W/8) codes: `Emu3VQVAE.encode` of the image as 4 frames."""
    enc, frames = vq.encoder, vq.config.temporal_downsample_factor
    hidden = enc.conv_in(pixels)  # Emu3VQVAEEncoder.forward's spatial part, once
    hidden = enc.middle_block(enc.down_block(hidden))
    hidden = enc.norm_out(hidden)
    hidden = enc.conv_out(hidden * torch.sigmoid(hidden))
    hidden = hidden[:, :, None].expand(-1, -1, frames, -1, -1)  # b c t h w: the frames `encode` repeats
    for conv in enc.time_conv:
        hidden = conv(hidden)
        hidden = hidden * torch.sigmoid(hidden)
    for layer in enc.time_res_stack:
        hidden = layer(hidden)
    latents = vq.quant_conv(hidden).permute(0, 2, 1, 3, 4)  # b t c h w
    return vq.quantize(latents)[:, 0]


def decode_first_frame(vq, codes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) codes -> (B, 3, 8h, 8w): `Emu3VQVAE.decode(codes)`, whose first frame is the image."""
    dec = vq.decoder
    b, h, w = codes.shape
    quant = vq.quantize.embedding(codes.flatten()).view(b, 1, h, w, -1).permute(0, 4, 1, 2, 3)  # b c t h w
    both = torch.cat((vq.post_quant_conv(quant), quant))  # Emu3VQVAEDecoder.forward's temporal part
    for layer in dec.time_res_stack:
        both = layer(both)
    for conv in dec.time_conv:
        both = conv(both)
        both = both * torch.sigmoid(both)
    hidden, quant = both[:, :, 0].chunk(2)  # the first frame of each
    hidden = dec.up_block(dec.middle_block(dec.conv_in(hidden), quant), quant)
    hidden = dec.norm_out(hidden, quant)
    return dec.conv_out(hidden * torch.sigmoid(hidden))


def image_rows(ids: list[int], device) -> slice | torch.Tensor:
    """Which rows of the LM head `image_head` multiplies (ids in codebook order): a slice where they are
    consecutive (Emu3's are 151854 + c), which indexes without copying 32,768 x 4096 weights at every step;
    the ids themselves otherwise."""
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return torch.tensor(ids, device=device)


def vq_factor(vq_config) -> int:
    """Pixels per VQ latent side: 8 for Emu3 (`Emu3VQVAE.vision_spatial_factor`)."""
    if isinstance(vq_config, dict):  # a config.json's, before the model is built
        multipliers = vq_config.get("channel_multiplier", (1, 2, 2, 4))  # Emu3VQVAEConfig's default
    else:
        multipliers = vq_config.channel_multiplier
    return 2 ** (len(multipliers) - 1)


def check_resolution(resolution: int, factor: int, context: int, name: str) -> int:
    """A side Emu3 can draw: a multiple of the VQ's factor whose image block (rows of side + 1 tokens, the
    header and its ends) fits the context with room for a prompt."""
    side = resolution // factor if resolution > 0 else 0
    largest = factor * max((s for s in range(1, 1024) if s * (s + 1) + PROMPT_ROOM <= context), default=0)
    if resolution % factor or not 0 < resolution <= largest:
        raise UserError(f"{name} draws square images whose side is a multiple of {factor} pixels, up to {largest} "
                        f"(its context holds {context} tokens); got --resolution {resolution}"
                        + (f" ({side} latents a side)" if side else ""))
    return resolution


PROMPT_ROOM = 64  # tokens left for the prompt and the image's header and ends when checking a resolution


def decoder_layers(model) -> list[torch.nn.Module]:
    """A transformers Emu3 model's decoder layers (the loader quantizes them before the backbone exists)."""
    return list(model.model.text_model.layers)


def refuse_original(folder: Path, *args, **kwargs):
    """The loader for BAAI's remote-code release: tokenbooth reads transformers' format only."""
    repo = PRESETS["emu3-gen"][0]
    raise UserError(f"{folder} is BAAI's original Emu3 release (remote code, VQ model in a separate repository); "
                    f"tokenbooth reads the transformers format: `hf download {repo}` and pass that folder")


def image_normalization(folder: Path) -> tuple[list, list]:
    """(image_mean, image_std) from the processor's files: transformers 5 writes processor_config.json with the
    image processor inside, older conversions preprocessor_config.json."""
    for name in PROCESSOR_FILES:
        path = folder / name
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read {path}: {e}") from None
            config = config.get("image_processor", config) if isinstance(config, dict) else {}
            mean, std = config.get("image_mean"), config.get("image_std")
            if _three_numbers(mean) and _three_numbers(std) and all(s > 0 for s in std):
                return mean, std
    raise UserError(f"Emu3 processor files missing: {folder / PROCESSOR_FILES[0]} (or {PROCESSOR_FILES[1]}) with the "
                    f"image processor's image_mean and image_std; they come with {PRESETS['emu3-gen'][0]}")


def _three_numbers(value) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def require_vq_weights(folder: Path) -> None:
    """The VQ-VAE is part of the -hf checkpoint (vqmodel.* on disk, transformers 4.48's layout, which 5.x maps to
    model.vqmodel.*); a folder without it cannot draw."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = json.loads(index.read_text()).get("weight_map", {})
        else:
            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                names = list(f.keys())
    except Exception:  # unreadable weights: load_pretrained names the problem
        return
    if not any(n.startswith("vqmodel.") or ".vqmodel." in n for n in names):
        raise UserError(f"Emu3 VQ model missing from {folder}: its weights hold no vqmodel.* tensors (the "
                        f"transformers checkpoint {PRESETS['emu3-gen'][0]} carries the VQ-VAE inside)")


def published_resolution(name: str | None, resolution: int | None) -> int:
    if resolution is not None:
        return resolution
    return PRESETS.get(name, PRESETS["emu3-gen"])[1]


def load_emu3(folder: Path, name: str | None = None, dtype=None, resolution: int | None = None,
              device: str | None = None, quantize: str = "none") -> Emu3Backbone:
    """dtype None: bfloat16, as BAAI's README and transformers' docs load Emu3 (the Hub's shards are float32,
    35 GB; read in bf16 they are half that)."""
    with quiet_imports():  # here, not at the top: transformers' model classes take seconds to import
        from transformers import Emu3ForConditionalGeneration

    folder = Path(folder)
    config = read_config(folder)
    tokenizer_path = require(folder / "tokenizer.json", "Emu3 text tokenizer")
    normalization = image_normalization(folder)
    require_vq_weights(folder)
    side = published_resolution(name, resolution)
    check_resolution(side, vq_factor(config.get("vq_config") or {}),
                     (config.get("text_config") or {}).get("max_position_embeddings", 9216), name or folder.name)
    model, _ = load_pretrained(Emu3ForConditionalGeneration, folder, dtype=dtype or torch.bfloat16, device=device,
                               quantize=quantize, decoder_layers=decoder_layers)
    model.model.vqmodel.float()  # its nearest-code search should not round in bf16
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises its own Exception type for unreadable files
        raise UserError(f"cannot read the text tokenizer {tokenizer_path}: {e}") from None
    return Emu3Backbone(name or folder.name, model, tokenizer, side, normalization, folder)


def blueprint_tokenizer(codes: int):
    """A word-level stand-in for Emu3's 184,622-entry vocabulary, for `tokenbooth plan`: the layout's tokens at
    their real ids (convert_emu3_weights_to_hf.py numbers the specials from 151643, BAAI's SPECIAL_START_ID:
    <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>, then the image tokens), digits and "*" for the
    size prefix; prompt words count one token each."""
    from tokenizers import Regex, models, pre_tokenizers

    start = 151643
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *[f"<|extra_{i}|>" for i in range(205)],
                IMAGE_WRAPPER, IMAGE_START, IMAGE_END, *[VISUAL_TOKEN.format(c) for c in range(codes)]]
    vocab = {"<unk>": 0, "*": 9, **{str(d): 15 + d for d in range(10)}}  # "*" and digits at GPT-2 byte ids
    vocab.update({t: start + i for i, t in enumerate(specials)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(r"[0-9*]"), "isolated")])
    return tok


def blueprint_backbone(name: str, model, tokenizer, resolution: int | None) -> Emu3Backbone:
    """The backbone over a model built from a shipped configuration with `blueprint_tokenizer`'s vocabulary as
    its vocabulary_map (plan/blueprints.py), and the processor's normalization (0.5 / 0.5)."""
    model.model.vqmodel.float()  # as load_emu3 keeps it
    return Emu3Backbone(name, model, tokenizer, published_resolution(name, resolution), ([0.5] * 3, [0.5] * 3))
