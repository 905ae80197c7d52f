"""Janus-Pro (DeepSeek): a Llama language model that draws images through a second, image-only vocabulary.

Loaded from the Hub folders in transformers' Janus format (deepseek-community/Janus-Pro-1B and -7B:
config.json with model_type "janus", bf16 safetensors, tokenizer.json, generation_config.json). This module
is the one place that decides Janus-Pro's layout, checked against deepseek-ai/Janus (README "Text-to-Image
Generation", `generation_inference.py`, `janus/utils/conversation.py` template "deepseek",
`janus/models/vq_model.py`) and transformers' `JanusForConditionalGeneration.generate`:

    <｜begin▁of▁sentence｜><|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>
    (24 x 24 image tokens) <end_of_image>

- No row-end tokens: the image body is 576 image tokens then <end_of_image>.
- Image tokens are not in the language model's vocabulary. They enter through `generation_embeddings` (the
  16384 x 8 codebook embedding) and `generation_aligner` (an MLP to the model width), and their logits come
  from `generation_head`; the text LM head is never used for images. tokenbooth gives them the ids
  image_base + code, image_base being the number of rows of the text embedding table, so one id sequence can
  mix text and image tokens; `image_head` is generation_head, already image-only and in codebook order, so
  the training loss is Janus's cross-entropy over the 16384 codes.
- Classifier-free guidance as Janus does it: the unconditional row is the prompt with every token but the
  first (BOS) and the last (<begin_of_image>) replaced by <｜▁pad▁｜>, same length, no attention mask.
- The VQ model (LlamaGen's VQ-16) compares l2-normalised latents with l2-normalised codebook entries and
  decodes normalised entries (VectorQuantizer with codebook_l2_norm=True); transformers' quantizer skips the
  normalisation when encoding, so encode and decode are written out here. The VQ model runs in float32.
- [V] is a token Janus's tokenizer does not have: tokenbooth adds it and uses the embedding row of its id,
  which the tokenizer leaves unused (102400 rows for ~100k tokenizer entries in Janus-Pro); a table without
  such a row grows by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer

from ..errors import UserError
from ..quiet import quiet_imports
from .base import ImageLayout, ImageLogits, parameters_outside, require_token
from .hf import load_pretrained, read_config, require

PRESETS = {
    "janus-pro-1b": ("deepseek-community/Janus-Pro-1B", 384),
    "janus-pro-7b": ("deepseek-community/Janus-Pro-7B", 384),
}
PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"  # conversation template "deepseek", empty system prompt
IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"
PAD = "<｜▁pad▁｜>"
BOS = "<｜begin▁of▁sentence｜>"
PLACEHOLDER = "<|tokenbooth_placeholder|>"  # the token [V] becomes; added to the tokenizer at load


class JanusBackbone(ImageLogits):
    family = "janus-pro"

    def __init__(self, name: str, model, tokenizer, folder: Path | None = None, special: dict | None = None):
        self.name, self.model, self.tokenizer, self.folder = name, model, tokenizer, folder
        self.janus = model.model  # JanusModel: language_model, vqmodel, generation_embeddings/aligner/head
        self.lm = self.janus.language_model
        self.device = self.lm.embed_tokens.weight.device
        config = model.config
        known = {"bos": config.text_config.bos_token_id, **(special or {})}  # ids the config files state
        self.bos, self.pad, self.boi = (known[k] if known.get(k) is not None else self._id(token)
                                        for k, token in (("bos", BOS), ("pad", PAD), ("boi", IMAGE_START)))
        self.eoi = self._id(IMAGE_END)
        self._add_placeholder_row()
        self.image_base = self.lm.embed_tokens.num_embeddings
        vq = config.vq_config
        self.resolution = config.vision_config.image_size
        downsample = 2 ** (len(vq.channel_multiplier) - 1)
        grid = self.resolution // downsample
        self.max_length = config.text_config.max_position_embeddings
        self.layout = ImageLayout(header=(self.boi,), rows=grid, cols=grid, row_end=None, image_end=self.eoi,
                                  image_token_ids=torch.arange(self.image_base, self.image_base + vq.num_embeddings))

    def _id(self, token: str) -> int:
        return require_token(self.tokenizer, token, self.name)

    def _add_placeholder_row(self) -> None:
        self.tokenizer.add_special_tokens([AddedToken(PLACEHOLDER, special=True, normalized=False)])
        pid = self._id(PLACEHOLDER)
        table = self.lm.embed_tokens
        if pid < table.num_embeddings:
            return
        grown = torch.nn.Embedding(pid + 1, table.embedding_dim, padding_idx=table.padding_idx,
                                   device=table.weight.device, dtype=table.weight.dtype)
        with torch.no_grad():
            grown.weight[: table.num_embeddings] = table.weight
            grown.weight[table.num_embeddings:] = table.weight.mean(0)
        self.lm.embed_tokens = grown

    # --- token layout ---

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.encode(PROMPT_TEMPLATE.format(prompt=prompt.strip()), add_special_tokens=False).ids
        return [self.bos, *text, *self.layout.header]

    def unconditional_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        if not prompt_ids:
            return [self.bos, *self.layout.header]
        return [prompt_ids[0], *[self.pad] * (len(prompt_ids) - 2), prompt_ids[-1]]

    # --- transformer ---

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Text ids through the language model's table, image ids through generation_embeddings + aligner."""
        ids = ids.to(self.device)
        is_image = ids >= self.image_base
        text = self.lm.embed_tokens(torch.where(is_image, torch.zeros_like(ids), ids))
        # every position goes through the image path too (text positions as code 0, then masked out): no
        # branch on the ids' values, so `tokenbooth plan` can run this on fake tensors; the aligner is tiny
        codes = (ids - self.image_base).clamp(min=0)
        image = self.janus.generation_aligner(self.janus.generation_embeddings(codes))
        return torch.where(is_image[..., None], image.to(text.device, text.dtype), text)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        to = lambda t: None if t is None else t.to(self.device)  # noqa: E731
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=to(attention_mask), position_ids=to(position_ids),
                      cache=cache, use_cache=cache is not None)
        return out.last_hidden_state, out.cache

    def image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """generation_head: image codes only, in codebook order (the text LM head never scores images)."""
        return self.janus.generation_head(hidden).float()

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The language model with its image input and output layers (generation_embeddings, _aligner, _head);
        not the understanding side (SigLIP vision tower and its aligner) nor the VQ model."""
        return parameters_outside(self.model, self.janus.vision_model, self.janus.aligner, self.janus.vqmodel)

    def input_embeddings(self) -> torch.nn.Embedding:
        return self.lm.embed_tokens

    def decoder_layers(self) -> list[torch.nn.Module]:
        return decoder_layers(self.model)

    def attention_layers(self) -> list:
        return [layer.self_attn for layer in self.decoder_layers()]

    def placeholder_candidates(self) -> list[str]:
        return [PLACEHOLDER]

    # --- images ---

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vq = self.janus.vqmodel
        weight = vq.quantize.embedding.weight
        latent = vq.quant_conv(vq.encoder(pixels.to(weight.device, weight.dtype)))
        z = F.normalize(latent.permute(0, 2, 3, 1).float(), dim=-1).to(weight.device)
        codebook = F.normalize(weight.float(), dim=-1)
        return (z @ codebook.t()).argmax(-1).cpu()  # nearest normalised entry = largest cosine

    @torch.no_grad()
    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        vq = self.janus.vqmodel
        entries = F.normalize(vq.quantize.embedding(codes.to(vq.quantize.embedding.weight.device)), dim=-1)
        pixels = vq.decoder(vq.post_quant_conv(entries.permute(0, 3, 1, 2).contiguous()))
        return pixels.clamp(-1, 1).float().cpu()


def decoder_layers(model) -> list[torch.nn.Module]:
    """A transformers Janus model's language-model decoder layers (`JanusBackbone.decoder_layers`; the loader
    needs them before the backbone exists, to quantize them)."""
    return list(model.model.language_model.layers)


def load_janus(folder: Path, name: str | None = None, dtype=None, resolution: int | None = None,
               device: str | None = None, quantize: str = "none") -> JanusBackbone:
    with quiet_imports():  # here, not at the top: transformers' model classes take seconds to import
        from transformers import JanusForConditionalGeneration

    folder = Path(folder)
    config = read_config(folder)
    native = config.get("vision_config", {}).get("image_size", 384)
    if resolution is not None and resolution != native:
        raise UserError(f"Janus-Pro draws {native}x{native} images only (got --resolution {resolution})")
    tokenizer_path = require(folder / "tokenizer.json")
    model, _ = load_pretrained(JanusForConditionalGeneration, folder, dtype=dtype, device=device, quantize=quantize,
                               decoder_layers=decoder_layers)
    model.model.vqmodel.float()  # small, and its codebook search should not round in bf16
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # tokenizers raises its own Exception type for unreadable files
        raise UserError(f"cannot read the text tokenizer {tokenizer_path}: {e}") from None
    special = {}
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():  # written by transformers' Janus conversion: pad and <begin_of_image> ids
        gen = json.loads(gen_path.read_text())
        special = {"pad": gen.get("pad_token_id"), "boi": gen.get("boi_token_id")}
    return JanusBackbone(name or folder.name, model, tokenizer, folder, special)
