"""Auto-regressive image sampling for any backbone: KV cache, batched classifier-free guidance, and the
structure rules of the backbone's image layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..errors import UserError
from .processors import SamplingConfig, image_token_distribution, sample


class GrowingBatch:
    """Left-padded sequences that grow together, fed to the backbone with or without a KV cache.

    Left padding keeps every row's newest token in the last column; position ids count real tokens
    only, so a padded row sees exactly the positions it would see alone.
    """

    def __init__(self, backbone, prefixes: list[list[int]], kv_cache: bool):
        self.backbone = backbone
        width = max(map(len, prefixes))
        self.ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prefixes])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prefixes])
        self.padded = bool((self.mask == 0).any())
        self.cache = DynamicCache() if kv_cache else None
        self.fed = 0  # columns already inside the cache
        self.forward_passes = 0

    def append(self, tokens: torch.Tensor) -> None:
        """tokens: (rows, t) new tokens for every row."""
        self.ids = torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)

    @torch.no_grad()
    def next_logits(self) -> torch.Tensor:
        """Image-code logits for the token after the last column: (rows, K)."""
        start = self.fed if self.cache is not None else 0
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        hidden, self.cache = self.backbone.hidden_states(
            self.ids[:, start:], attention_mask=self.mask if self.padded else None,
            position_ids=positions[:, start:], cache=self.cache)
        if self.cache is not None:
            self.fed = self.ids.shape[1]
        self.forward_passes += 1
        # only the last column is sampled from: the output layer runs on it alone, not on the whole prefix
        return self.backbone.image_head(hidden[:, -1]).cpu()  # sampling happens on the CPU


@dataclass
class SamplingStats:
    forward_passes: int = 0
    tokens: int = 0


def check_prompt_fits(backbone, prefix: list[int]) -> None:
    needed = len(prefix) + backbone.layout.body_length
    if needed > backbone.max_length:
        room = backbone.max_length - backbone.layout.body_length - (len(prefix) - len(backbone.layout.header))
        raise UserError(f"prompt too long for {backbone.name}: the prompt and image need {needed} tokens, the "
                        f"context holds {backbone.max_length} (shorten the prompt by about {-room} tokens)")


def guidance_batches(backbone, prompts: list[str], cfg: SamplingConfig, make) -> list:
    """The rows classifier-free guidance needs: the prompts' prefixes, then (when guided) as many
    unconditional ones, in one batch or in two. `make(prefixes, copies)` builds a batch; copies is how
    many rows each image has in it."""
    cfg.validate()
    cond = [backbone.prompt_ids(p) for p in prompts]
    for prefix in cond:
        check_prompt_fits(backbone, prefix)
    if cfg.cfg_scale == 1.0:
        return [make(cond, 1)]
    uncond = [backbone.unconditional_ids(prefix) for prefix in cond]
    if cfg.batched_cfg:
        return [make(cond + uncond, 2)]
    return [make(cond, 1), make(uncond, 1)]


def sample_image_tokens(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
                        stats: SamplingStats | None = None) -> torch.Tensor:
    """Draws one image per prompt; returns codebook indices (B, rows, cols)."""
    body = sample_image_body(backbone, prompts, cfg, progress, stats)
    return backbone.layout.codes_from_body(body)


def sample_image_body(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
                      stats: SamplingStats | None = None) -> torch.Tensor:
    """Draws one image block per prompt; returns its vocabulary ids after the header (B, body_length)."""
    layout = backbone.layout
    n, guided = len(prompts), cfg.cfg_scale != 1.0
    groups = guidance_batches(backbone, prompts, cfg, lambda prefixes, copies: GrowingBatch(backbone, prefixes, cfg.kv_cache))

    def logits_pair():
        out = torch.cat([g.next_logits() for g in groups])
        return out[:n], (out[n:] if guided else None)

    generator = torch.Generator().manual_seed(cfg.seed)
    body = torch.empty(n, layout.body_length, dtype=torch.long)
    bar = _progress(layout.body_length, progress)
    for j in range(layout.body_length):
        forced = layout.forced_token(j)
        if forced is not None:
            # Structure tokens are certain: no forward pass is spent on them; they are fed together with
            # the next image token's pass.
            token = torch.full((n,), forced, dtype=torch.long)
        else:
            probs = image_token_distribution(*logits_pair(), cfg)
            token = layout.token_ids(sample(probs, generator))
        body[:, j] = token
        for g in groups:
            g.append(token.repeat(g.ids.shape[0] // n, 1).reshape(-1, 1))
        bar.update(1)
    bar.close()
    if stats is not None:
        stats.forward_passes += sum(g.forward_passes for g in groups)
        stats.tokens += n * layout.body_length
    return body


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="tokens", unit="tok", disable=not enabled, leave=False)

