"""[V], the word for the subject: reserved vocabulary rows whose embeddings are what stage 1 learns.

Prompts write the placeholder string (PLACEHOLDER, "[V]" unless --placeholder says otherwise); the tokenizer
sees the reserved token(s) it stands for (adapter.substitute_placeholder).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .adapter import substitute_placeholder

if TYPE_CHECKING:  # config.py imports this module for PLACEHOLDER
    from .config import TrainConfig

PLACEHOLDER = "[V]"  # the paper's (and DreamBench's unique_token) string for the subject


def remove_placeholder(prompt: str, placeholder: str = PLACEHOLDER) -> str:
    """The prompt without its subject word, for the base model or CLIP-T: "a [V] dog" -> "a dog"."""
    return " ".join(prompt.replace(placeholder, " ").split()) if placeholder else prompt


def placeholder_tokens(backbone, num_vectors: int) -> list[str]:
    """The reserved tokens [V] stands for: the first `num_vectors` free ones."""
    candidates = backbone.placeholder_candidates()
    if len(candidates) < num_vectors:
        raise UserError(f"{backbone.name} has {len(candidates)} free vocabulary row(s) for the placeholder, "
                        f"--num-vectors asks for {num_vectors}")
    return candidates[:num_vectors]


class Placeholder:
    """[V]: reserved vocabulary rows (one unless --num-vectors) whose embeddings are the one thing stage 1
    learns. The embedding is one vector for a single token (the paper's, and the adapter format's since the
    start), a (num_vectors, width) matrix otherwise."""

    def __init__(self, backbone, cfg: TrainConfig, generator: torch.Generator):
        self.tokens = placeholder_tokens(backbone, cfg.num_vectors)
        self.text, self.token = cfg.placeholder, "".join(self.tokens)  # the prompt's [V] becomes all of them
        self.token_ids = [backbone.tokenizer.token_to_id(t) for t in self.tokens]
        table = backbone.input_embeddings().weight.detach()
        shape = (table.shape[1],) if cfg.num_vectors == 1 else (cfg.num_vectors, table.shape[1])
        if cfg.init_token:
            ids = backbone.tokenizer.encode(cfg.init_token, add_special_tokens=False).ids
            if not ids:
                raise UserError(f"--init-token {cfg.init_token!r} has no tokens")
            init = table[ids].float().mean(0).expand(shape)
        else:  # random, at the scale of the existing rows
            init = torch.randn(shape, generator=generator).to(table.device) * _std(table)
        # fp32 master copy even when the model is bf16, on the table's device
        self.embedding = torch.nn.Parameter(init.float().clone())

    @property
    def rows(self) -> torch.Tensor:
        """(num_vectors, width): one row per reserved token."""
        return self.embedding.reshape(len(self.token_ids), -1)

    def embed(self, backbone, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with [V]'s rows taken from the trainable copy."""
        embeds = backbone.embed(ids)
        ids = ids.to(embeds.device)
        for token_id, row in zip(self.token_ids, self.rows):
            embeds = torch.where((ids == token_id)[..., None], row.to(embeds.dtype), embeds)
        return embeds

    def prompt_ids(self, backbone, prompt: str) -> list[int]:
        return backbone.prompt_ids(substitute_placeholder(prompt, self.text, self.token))


def _std(table: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """The table's standard deviation in fp32, a block of rows at a time: no fp32 copy of the whole table
    (1 GB for Lumina-mGPT's 65,536 x 4096)."""
    mean = sum(block.float().sum() for block in table.split(rows)) / table.numel()
    return (sum(((block.float() - mean) ** 2).sum() for block in table.split(rows)) / (table.numel() - 1)).sqrt()
