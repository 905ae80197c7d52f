"""Auto-regressive image sampling for any backbone: KV cache, batched classifier-free guidance, and the
structure rules of the backbone's image layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
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


# Plain sampling grows every row by one token a pass and keeps transformers' DynamicCache (GrowingBatch above:
# on mini's CPU runs a few percent faster than the ragged buffer below). SJD moves each image at its own pace
# and truncates rejected drafts per row, which is what RaggedBatch and RaggedCache are for.

class RaggedCache:
    """A KV cache (transformers calls `update` once per layer) whose rows hold sequences of different lengths.

    `lengths[r]` columns of row r are valid. A pass writes each row's new keys and values at its own columns
    (`start`, set before the pass, onwards) and returns the buffer up to the longest row; the pass's attention
    mask hides from every row what lies past its own end. Truncating a row (dropping rejected drafts) is just
    lowering its length: the next pass overwrites those columns.
    """

    def __init__(self, rows: int, columns: int):
        self.columns = columns
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.start = self.lengths
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def prepare(self, start: torch.Tensor, width: int) -> None:
        """Before a pass: row r's `width` new columns go to start[r] onwards."""
        self.start, self.end, self.index = start, int(start.max()) + width, None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows, heads, width, dim = key.shape
        if layer_idx == len(self.keys):
            self.keys.append(key.new_zeros(rows, heads, self.columns, dim))
            self.values.append(value.new_zeros(rows, heads, self.columns, dim))
        if self.index is None:  # once per pass: where (row, head, column) lands in a buffer seen as (-1, dim)
            self.index = ((torch.arange(rows)[:, None, None] * heads + torch.arange(heads)[:, None]) * self.columns
                          + self.start[:, None, None] + torch.arange(width)).reshape(-1).to(key.device)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.view(-1, dim).index_copy_(0, self.index, key.reshape(-1, dim))
        values.view(-1, dim).index_copy_(0, self.index, value.reshape(-1, dim))
        return keys[:, :, :self.end], values[:, :, :self.end]

    def move_columns(self, rows: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copies, in every layer, row rows[i]'s keys and values at column source[i] to column target[i]."""
        for buffer in self.keys + self.values:
            at = rows.to(buffer.device)
            buffer[at, :, target.to(buffer.device)] = buffer[at, :, source.to(buffer.device)]

    def select(self, rows: torch.Tensor) -> None:
        self.lengths, self.start = self.lengths[rows], self.start[rows]
        self.keys = [k[rows.to(k.device)] for k in self.keys]
        self.values = [v[rows.to(v.device)] for v in self.values]


class RaggedBatch:
    """The rows of one forward pass (prompts' prefixes, conditional and unconditional), each row its prefix
    then the image body, left-aligned: body position k of row r sits in column prefix[r] + k, so a row sees
    exactly the positions it would see alone. Each pass feeds every row from where its cache ends to where
    that row asks; rows need not be equally far (SJD moves each image at its own pace).

    body_room: body positions a row may be fed (the body, plus an SJD window and its proactive branch past it)."""

    def __init__(self, backbone, prefixes: list[list[int]], kv_cache: bool, body_room: int, copies: int):
        self.backbone, self.kv_cache, self.copies = backbone, kv_cache, copies
        self.prefix = torch.tensor([len(p) for p in prefixes])
        columns = int(self.prefix.max()) + body_room
        self.seq = torch.zeros(len(prefixes), columns, dtype=torch.long)
        for r, p in enumerate(prefixes):
            self.seq[r, :len(p)] = torch.tensor(p)
        self.cache = RaggedCache(len(prefixes), columns)  # empty: the first pass feeds the prefixes too
        self.dtype = backbone.input_embeddings().weight.dtype
        self.forward_passes = 0

    def rows(self, per_image: torch.Tensor) -> torch.Tensor:
        """A per-image tensor repeated for each copy (conditional rows, then unconditional ones)."""
        return per_image.repeat(self.copies, *[1] * (per_image.dim() - 1))

    @torch.no_grad()
    def feed(self, end: torch.Tensor, branch: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """Runs every row from its cache end to column end[r] (exclusive): hidden states (rows, width, H),
        row r's first column being its cache end.

        branch: (column, root, D), column and root (rows,): row r's columns column[r] .. column[r] + D - 1
        hold a side branch, tokens read as if they came right after column root[r] (their positions, and
        what they see: root[r] and before it, and the branch up to themselves), not after the window."""
        start = self.cache.lengths if self.kv_cache else torch.zeros_like(self.cache.lengths)
        width = int((end - start).max())
        columns = start[:, None] + torch.arange(width)
        # a row whose window is shorter reads a few columns past it: computed, never used, overwritten later
        ids = self.seq.gather(1, columns.clamp(max=self.seq.shape[1] - 1))
        keys = torch.arange(int(start.max()) + width)
        visible = keys[None, None, :] <= columns[:, :, None]  # causal, each row at its own offset
        positions = columns
        if branch is not None:
            # The window's drafts never see the branch (it lies to their right); the branch sees the fixed
            # tokens up to its root and itself, never the window's drafts.
            column, root, depth = branch
            step = columns - column[:, None]
            here = (step >= 0) & (step < depth)
            positions = torch.where(here, root[:, None] + 1 + step, columns)
            own = (keys[None, None, :] <= root[:, None, None]) | \
                ((keys[None, None, :] >= column[:, None, None]) & (keys[None, None, :] <= columns[:, :, None]))
            visible = torch.where(here[:, :, None], own, visible)
        mask = torch.where(visible, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        self.cache.prepare(start, width)
        hidden, _ = self.backbone.hidden_states(ids, attention_mask=mask[:, None], position_ids=positions,
                                                cache=self.cache)
        self.forward_passes += 1
        return hidden

    def window_logits(self, body_ids: torch.Tensor, first: torch.Tensor, slots: int,
                      branch_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Writes each image's body tokens at positions first .. first + slots - 1 (body_ids (images, slots);
        position -1 is the header's last token, already there) and returns the image-code logits predicting
        positions first + 1 .. first + slots: (rows, slots, K).

        branch_ids (images, D): other candidates for positions first + 1 .. first + D, fed beside the window
        (in the D columns past it) as a branch that sees the tokens up to `first` and itself, never the
        window's drafts; their logits come after the window's: (rows, slots + D, K)."""
        first, body_ids = self.rows(first), self.rows(body_ids)
        columns = self.prefix[:, None] + first[:, None] + torch.arange(slots)
        inside = columns >= self.prefix[:, None]  # position -1, the header's last token, stays as it is
        self.seq.scatter_(1, columns, torch.where(inside, body_ids, self.seq.gather(1, columns)))
        branch = None
        if branch_ids is not None:
            depth = branch_ids.shape[1]
            side = columns[:, -1:] + 1 + torch.arange(depth)
            self.seq.scatter_(1, side, self.rows(branch_ids))
            branch = (side[:, 0], columns[:, 0], depth)
            columns = torch.cat([columns, side], dim=1)
        hidden = self.feed(columns[:, -1] + 1, branch)
        start = self.cache.lengths if self.kv_cache else torch.zeros_like(self.cache.lengths)
        at = (columns - start[:, None]).to(hidden.device)
        hidden = hidden.gather(1, at[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self.backbone.image_head(hidden).cpu()  # sampling happens on the CPU

    def adopt_branch(self, taken: torch.Tensor, first: torch.Tensor, slots: int, branch_ids: torch.Tensor) -> None:
        """After `window_logits(..., slots, branch_ids)`: image i's first taken[i] branch tokens are now its
        tokens at positions first + 1 onwards. Their ids, and their keys and values (computed with exactly
        those positions' context), move into those positions' columns, so the cache stays whole."""
        taken = self.rows(taken)
        body = self.prefix + self.rows(first) + 1
        side = body - 1 + slots  # where window_logits fed the branch: the columns past the window
        ids = self.rows(branch_ids)
        for step in range(int(taken.max()) if len(taken) else 0):
            rows = (taken > step).nonzero()[:, 0]
            self.seq[rows, body[rows] + step] = ids[rows, step]
            if self.kv_cache:
                self.cache.move_columns(rows, side[rows] + step, body[rows] + step)

    def keep(self, fixed_until: torch.Tensor) -> None:
        """Body positions before fixed_until[image] were fed with their final tokens: the cache keeps them."""
        if self.kv_cache:
            self.cache.lengths = self.prefix + self.rows(fixed_until)

    def select(self, images: torch.Tensor) -> None:
        """Keeps the rows of these images (a bool mask over the images still in the batch)."""
        rows = self.rows(images).nonzero()[:, 0]
        self.prefix, self.seq = self.prefix[rows], self.seq[rows]
        self.cache.select(rows)


@dataclass
class SamplingStats:
    forward_passes: int = 0
    tokens: int = 0

    def add(self, other: "SamplingStats") -> None:
        """Counts another batch's figures in (a run drawn in batches reports them together)."""
        self.forward_passes += other.forward_passes
        self.tokens += other.tokens


def check_prompt_fits(backbone, prefix: list[int]) -> None:
    needed = len(prefix) + backbone.layout.body_length
    if needed > backbone.max_length:
        excess = needed - backbone.max_length
        raise UserError(f"prompt too long for {backbone.name}: the prompt and image need {needed} tokens, the "
                        f"context holds {backbone.max_length} (shorten the prompt by at least {excess} "
                        f"token{'s' if excess > 1 else ''})")


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
    return tqdm(total=total, desc="tokens", unit="tok", disable=not enabled, leave=False)

