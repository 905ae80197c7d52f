"""The small protocol every backbone implements, and the image-block layout it declares.

A backbone is a text tokenizer, an image tokenizer and a decoder-only transformer, with one id space for
text and image tokens (Chameleon's vocabulary holds both; Janus-Pro's image tokens get ids after its text
vocabulary). The sampler and the personalization recipe only talk to this protocol, so mini, Lumina-mGPT
and Janus-Pro run through the same code.

Shared code speaks in image codes (codebook indices 0..K-1), never in output-vocabulary columns: a backbone's
`image_head` scores the K codes in codebook order, whichever rows of its output layer they are (Chameleon:
8,192 rows of a 65,536-row LM head; Janus-Pro: its image-only generation head). Token ids appear only where a
sequence is fed to the transformer, and the layout turns codes into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import UserError


@dataclass(frozen=True)
class ImageLayout:
    """Where each token of a generated image goes.

    An image block is `header` (e.g. image-start, height and width tokens), then `rows` rows of `cols`
    image tokens each followed by `row_end` (if the backbone has one), then `image_end`.
    """

    header: tuple[int, ...]
    rows: int
    cols: int
    row_end: int | None
    image_end: int
    image_token_ids: torch.Tensor  # codebook index -> vocabulary id
    trailer: tuple[int, ...] = ()  # what a training sequence holds after image_end (Lumina-mGPT: its turn end)

    @property
    def row_length(self) -> int:
        return self.cols + (1 if self.row_end is not None else 0)

    @property
    def body_length(self) -> int:
        """Tokens after the header, image_end included."""
        return self.rows * self.row_length + 1

    def forced_token(self, j: int) -> int | None:
        """The structure token that position j of the body must hold, or None for an image token."""
        if j == self.body_length - 1:
            return self.image_end
        if self.row_end is not None and (j + 1) % self.row_length == 0:
            return self.row_end
        return None

    @property
    def codebook_size(self) -> int:
        """K, the size of the image codebook."""
        return len(self.image_token_ids)

    def image_positions(self) -> torch.Tensor:
        """(body_length,) bool: True where the body holds an image token, False at structure tokens."""
        return torch.tensor([self.forced_token(j) is None for j in range(self.body_length)])

    def token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> the vocabulary ids that feed them to the transformer (any shape)."""
        return self.image_token_ids.to(codes.device)[codes]

    def body_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codebook indices -> (B, body_length) vocabulary ids."""
        ids = self.token_ids(codes)
        b = ids.shape[0]
        if self.row_end is not None:
            ids = torch.cat([ids, ids.new_full((b, self.rows, 1), self.row_end)], dim=2)
        return torch.cat([ids.reshape(b, -1), ids.new_full((b, 1), self.image_end)], dim=1)

    def codes_from_body(self, body: torch.Tensor) -> torch.Tensor:
        """(B, body_length) vocabulary ids -> (B, rows, cols) codebook indices."""
        grid = body[:, : self.rows * self.row_length].reshape(-1, self.rows, self.row_length)[:, :, : self.cols]
        lookup = torch.full((int(self.image_token_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.image_token_ids] = torch.arange(len(self.image_token_ids))
        codes = lookup[grid.cpu()]
        if (codes < 0).any():
            raise ValueError("image body holds a token that is not an image token")
        return codes.to(body.device)

    def body_labels(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codebook indices -> (B, body_length) training labels: the code at every image
        position, -100 (ignored by the loss) at structure positions."""
        labels = torch.full((codes.shape[0], self.body_length), -100, dtype=torch.long, device=codes.device)
        labels[:, self.image_positions().to(codes.device)] = codes.reshape(codes.shape[0], -1)
        return labels


def require_token(tokenizer, token: str, model_name: str) -> int:
    """The id of a token the backbone's layout needs; a tokenizer without it belongs to another model."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise UserError(f"{model_name}: tokenizer has no token {token!r}")
    return tid


class Backbone(Protocol):
    """What the sampler and the personalization recipe need from a model family."""

    name: str
    resolution: int  # pixels per side of the images it draws
    layout: ImageLayout
    max_length: int  # context length
    family: str  # picks personalization and sampling defaults (backbones/families.py)
    folder: object  # where the base weights live (adapters record their fingerprint)
    model: torch.nn.Module  # the whole network (adapters load their layer tensors into it by name)
    tokenizer: object  # a `tokenizers.Tokenizer` for the text side

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the conditional prefix for `prompt`, ending with the image header."""

    def unconditional_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """Token ids of the unconditional prefix for classifier-free guidance, ending with the header.
        prompt_ids: the conditional prefix it stands beside (Janus masks that one; Chameleon ignores it)."""

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      cache=None) -> tuple[torch.Tensor, object]:
        """The transformer's last hidden states (B, T, H) and the updated KV cache (a transformers `Cache`,
        or None to run without one). Inputs may live on the CPU; outputs live on the model's device."""

    def image_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states -> (..., K) float32 logits of the K image codes, in codebook order.
        Only the image rows of the output layer are multiplied."""

    def image_logits(self, input_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, object]:
        """image_head(hidden_states(...)) and the cache: `ImageLogits` gives every backbone this one."""

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The language transformer's parameters personalization may train, named as in
        `model.named_parameters()`: never the image tokenizer or a vision encoder."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of a token id sequence (what `hidden_states` computes from input_ids)."""

    def input_embeddings(self) -> torch.nn.Embedding:
        """The text token embedding table, where [V] gets its row."""

    def decoder_layers(self) -> list[torch.nn.Module]:
        """The transformer's decoder layers (blocks), in order: what a quantized base stores in 4 or 8 bits
        (backbones/quantize.py) and what `tokenbooth plan` follows. Each holds one of `attention_layers()`."""

    def attention_layers(self) -> list:
        """Self-attention modules with q_proj, k_proj, v_proj: stage 2's default targets."""

    def placeholder_candidates(self) -> list[str]:
        """Tokens free to become [V], in the order personalization should take them; each is in the
        tokenizer and has a row in `input_embeddings()`."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, rows, cols) codebook indices, on the CPU."""

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codebook indices -> (B, 3, R, R) in [-1, 1], float32 on the CPU."""


class ImageLogits:
    """Mixed into every backbone: the one composition of its `hidden_states` and `image_head`."""

    def image_logits(self, input_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, object]:
        hidden, cache = self.hidden_states(input_ids, **kwargs)
        return self.image_head(hidden), cache


def parameters_outside(model: torch.nn.Module, *excluded: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`model`'s named parameters except those of the `excluded` submodules (found by identity, not name)."""
    skip = {id(p) for module in excluded for p in module.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) not in skip}
