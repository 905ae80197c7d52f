"""The small protocol every backbone implements, and the image-block layout it declares.

A backbone is a text tokenizer, an image tokenizer and a decoder-only transformer, with one id space for
text and image tokens (Chameleon's vocabulary holds both; Janus-Pro's image tokens get ids after its text
vocabulary). The sampler and the personalization recipe only talk to this protocol, so mini, Lumina-mGPT
and Janus-Pro run through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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

    def body_from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codebook indices -> (B, body_length) vocabulary ids."""
        ids = self.image_token_ids.to(codes.device)[codes]
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


def require_token(tokenizer, token: str, model_name: str) -> int:
    """The id of a token the backbone's layout needs; a tokenizer without it belongs to another model."""
    from ..errors import UserError

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
    family: str  # picks personalization defaults
    folder: object  # where the base weights live (adapters record their fingerprint)
    model: torch.nn.Module  # the whole network: personalization selects its parameters by name
    tokenizer: object  # a `tokenizers.Tokenizer` for the text side
    logit_offset: int  # logits()[..., j] scores token id logit_offset + j (0 unless only later ids can follow)

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the conditional prefix for `prompt`, ending with the image header."""

    def unconditional_ids(self, prompt_ids: list[int] | None = None) -> list[int]:
        """Token ids of the unconditional prefix for classifier-free guidance, ending with the header.
        prompt_ids: the conditional prefix it stands beside (Janus masks that one; Chameleon ignores it)."""

    def logits(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, past_key_values=None, inputs_embeds=None):
        """Logits of every token id from `logit_offset` on (float32, nothing masked) and the updated KV cache.
        Inputs may live on the CPU; outputs live on the model's device."""

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of a token id sequence (what `logits` computes from input_ids)."""

    def input_embeddings(self) -> torch.nn.Embedding:
        """The text token embedding table, where [V] gets its row."""

    def attention_layers(self) -> list:
        """Self-attention modules with q_proj, k_proj, v_proj: stage 2's default targets."""

    def placeholder_candidates(self) -> list[str]:
        """Tokens free to become [V], in the order personalization should take them; each is in the
        tokenizer and has a row in `input_embeddings()`."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> (B, rows, cols) codebook indices, on the CPU."""

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) codebook indices -> (B, 3, R, R) in [-1, 1], float32 on the CPU."""
