"""Speculative Jacobi Decoding (Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding"): the images `sample_image_body` draws, in fewer forward passes.

Each pass feeds a window of L draft tokens after the accepted prefix and gives the processed distribution
p_i (CFG, structure rules, top-k, temperature, top-p: exactly the plain sampler's) at every window position.
Walking the window left to right, draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), q_i
being the distribution x_i was drawn from; the first rejected position takes a token from
norm(max(0, p_i - q_i)) and ends the walk. That is speculative sampling's accept/reject step, so every token
that leaves the window is distributed exactly as plain sampling would draw it. If the whole window is
accepted, the pass's distribution one past the window is exact too and gives a bonus token. Drafts not
accepted are re-drawn from this pass's p (which becomes their q), new window positions are initialised, and
the KV cache forgets every position whose fed token did not survive.

Initialising a new draft position (`init`):
  random  a uniform image token, q = uniform over the K image tokens: its true law. (The paper's one-hot q is
          exact as well, see `above`, but accepts with probability sum_x p(x)/K instead of
          sum_x min(p(x), 1/K), which is never larger.)
  above   the token one image row up, q = one-hot on it. With a one-hot q the test accepts x with p(x) and the
          residual is p without x, renormalised: together exactly p, whatever x is and however it was chosen.
          The first row has nothing above and falls back to random.

Structure tokens (row ends, image end) are certain: they sit in the window like any token, are always
accepted, and are skipped over when they come right after the accepted prefix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from .processors import SamplingConfig, image_token_distribution
from .sampler import GrowingBatch, SamplingStats, _progress, guidance_batches

INITS = ("random", "above")
DEFAULT_WINDOW = 16  # the SJD paper's window length


@dataclass
class SJDStats(SamplingStats):
    passes_per_image: list[int] = field(default_factory=list)  # passes each image took part in until done
    # image tokens one image fixed in one pass (its accepted drafts plus the corrected or bonus token) -> count
    tokens_per_pass: Counter = field(default_factory=Counter)

    @property
    def mean_tokens_per_pass(self) -> float:
        total = sum(self.tokens_per_pass.values())
        return sum(k * v for k, v in self.tokens_per_pass.items()) / total if total else 0.0


def check_sjd_options(window: int, init: str, body_length: int | None = None) -> None:
    if init not in INITS:
        raise UserError(f"--sjd-init must be one of {', '.join(INITS)} (got {init!r})")
    if window < 1 or (body_length is not None and window > body_length):
        upper = f" and at most the image body's {body_length} tokens" if body_length is not None else ""
        raise UserError(f"--sjd-window must be at least 1{upper} (got {window})")


def speculative_accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p/q); u is uniform in [0, 1). Written without the division so that
    q(x) = 0 (never drawn, but kept safe) accepts whenever p(x) > 0."""
    return u * q_x < p_x


class DraftBatch(GrowingBatch):
    """A GrowingBatch whose whole image body is laid out up front and rewritten as drafts change. Body
    position k sits in column width + k for every row, so one crop of the KV cache fits all rows."""

    def __init__(self, backbone, prefixes: list[list[int]], kv_cache: bool, body_length: int, copies: int):
        super().__init__(backbone, prefixes, kv_cache)
        self.width = self.ids.shape[1]
        self.copies = copies  # rows per image: 1, or 2 when cond and uncond share this batch
        self.append(torch.zeros(len(prefixes), body_length, dtype=torch.long))
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)

    def forget_from(self, body_pos: int) -> None:
        """Drops cached keys/values of body positions >= body_pos."""
        keep = self.width + body_pos
        if self.cache is not None and self.fed > keep:
            self.cache.crop(keep - self.fed)  # transformers 5: a negative count removes that many tokens
            self.fed = keep

    @torch.no_grad()
    def body_logits(self, body: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """Logits predicting body positions first..last (inclusive) with `body` (images, body_length) in
        place: (rows, last - first + 1, K). Position 0 is predicted by the last header token."""
        self.ids[:, self.width:] = body.repeat(self.copies, 1)
        begin, end = self.width + first - 1, self.width + last  # input columns whose outputs we want
        start = self.fed if self.cache is not None else 0
        hidden, self.cache = self.backbone.hidden_states(
            self.ids[:, start:end], attention_mask=self.mask[:, :end] if self.padded else None,
            position_ids=self.positions[:, start:end], cache=self.cache)
        if self.cache is not None:
            self.fed = end
        self.forward_passes += 1
        return self.backbone.image_head(hidden[:, begin - start:]).cpu()


def sample_image_body_sjd(backbone, prompts: list[str], cfg: SamplingConfig, window: int = DEFAULT_WINDOW,
                          init: str = "random", progress: bool = False, stats: SamplingStats | None = None,
                          _accept=speculative_accept) -> torch.Tensor:
    """Draws one image block per prompt with SJD; returns its vocabulary ids after the header
    (B, body_length), distributed as `sample_image_body`'s. `_accept` is for tests only (a broken rule must
    make the distribution test fail)."""
    cfg.validate()
    layout = backbone.layout
    bl, K, L, R = layout.body_length, layout.codebook_size, window, layout.row_length
    check_sjd_options(window, init, bl)
    n, guided = len(prompts), cfg.cfg_scale != 1.0
    groups = guidance_batches(backbone, prompts, cfg,
                              lambda prefixes, copies: DraftBatch(backbone, prefixes, cfg.kv_cache, bl, copies))

    forced_ids = torch.tensor([-1 if layout.forced_token(j) is None else layout.forced_token(j) for j in range(bl)])
    forced = forced_ids >= 0
    images_before = torch.cat([torch.zeros(1, dtype=torch.long), (~forced).long().cumsum(0)])  # per position

    def body_ids(codes):
        return torch.where(forced, forced_ids, layout.token_ids(codes))

    def skip_forced(a):
        while True:
            step = (a < bl) & forced[a.clamp(max=bl - 1)]
            if not step.any():
                return a
            a = a + step.long()

    generator = torch.Generator().manual_seed(cfg.seed)
    codes = torch.zeros(n, bl, dtype=torch.long)  # drafts and accepted tokens, as codebook indices
    q = torch.empty(n, L, K)  # q[r, k]: the law codes[r, a[r] + k] was drawn from
    uniform = torch.full((K,), 1.0 / K)

    def initialise(a, fresh):
        """New drafts for window slots with fresh[r, k] (positions a[r] + k), in order so that `above`
        can copy a draft made in the same call."""
        for k in range(L):
            pos = (a + k).clamp(max=bl - 1)
            drawn = torch.randint(K, (n,), generator=generator)
            rows = fresh[:, k]
            if init == "above":
                has_above = rows & (pos >= R)
                above = codes[torch.arange(n), (pos - R).clamp(min=0)]
                copy = torch.where(has_above, above, drawn)
                codes[rows, pos[rows]] = copy[rows]
                q[rows, k] = torch.where(has_above[rows, None], F.one_hot(copy[rows], K).float(),
                                         uniform)
            else:
                codes[rows, pos[rows]] = drawn[rows]
                q[rows, k] = uniform

    a = skip_forced(torch.zeros(n, dtype=torch.long))  # accepted body positions per image
    initialise(a, torch.ones(n, L, dtype=torch.bool))
    slots = torch.arange(L + 1)
    passes = torch.zeros(n, dtype=torch.long)
    histogram = Counter()
    bar = _progress(n * bl, progress)
    bar.update(int(a.sum()))
    while (a < bl).any():
        active = a < bl
        first = int(a.min())
        last = int(torch.clamp(a + L, max=bl - 1)[active].max())
        body = body_ids(codes)
        logits = torch.cat([g.body_logits(body, first, last) for g in groups])  # (rows, T, K)
        T = logits.shape[1]
        p = image_token_distribution(logits[:n].reshape(-1, K), logits[n:].reshape(-1, K) if guided else None,
                                     cfg).reshape(n, T, K)

        # The window of image r: positions a[r] + k, k < L, plus one past it for the bonus token.
        pos = a[:, None] + slots
        inside = pos < bl
        p_win = p.gather(1, (pos - first).clamp(0, T - 1)[:, :, None].expand(-1, -1, K))
        x = codes.gather(1, pos[:, :L].clamp(max=bl - 1))
        u = torch.rand(n, L, generator=generator)
        ok = _accept(p_win[:, :L].gather(2, x[:, :, None])[:, :, 0], q.gather(2, x[:, :, None])[:, :, 0], u)
        ok = (ok | forced[pos[:, :L].clamp(max=bl - 1)]) & inside[:, :L]
        accepted = ok.long().cumprod(1).sum(1)
        stop = a + accepted  # the corrected or bonus position
        rejected = active & (accepted < L) & (stop < bl)
        bonus = active & (accepted == L) & (stop < bl)

        # One fresh token where the walk stopped: the residual after a rejection, p itself after a full window.
        at_stop = torch.arange(n), accepted.clamp(max=L - 1)
        residual = (p_win[at_stop] - q[at_stop]).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_win[at_stop])  # p == q: no residual
        law = torch.where(rejected[:, None], residual, p_win[:, L])
        fixed = torch.multinomial(law, 1, generator=generator)[:, 0]
        redrawn = torch.multinomial(p_win.reshape(-1, K), 1, generator=generator).reshape(n, L + 1)
        sets = (rejected | bonus) & ~forced[stop.clamp(max=bl - 1)]
        codes[sets, stop[sets]] = fixed[sets]

        # The cache keeps only positions whose fed token survived: those before the stop.
        survived = torch.where(active, stop, torch.full_like(stop, bl))
        for g in groups:
            g.forget_from(int(survived.min()))

        new_a = torch.where(active, skip_forced(stop + (rejected | bonus).long()), a)
        passes += active.long()
        done_now = images_before[new_a] - images_before[a]
        histogram.update(done_now[active].tolist())
        bar.update(int((new_a - a).sum()))

        # Next window: drafts this pass saw are redrawn from its p (which becomes their q); the rest are new.
        source = new_a[:, None] + slots[:L] - a[:, None]  # slot in this pass's window, or > L if unseen
        seen = (source <= L) & active[:, None]
        src = source.clamp(max=L)
        new_pos = (new_a[:, None] + slots[:L]).clamp(max=bl - 1)
        redraw = seen & (new_a[:, None] + slots[:L] < bl)
        codes[redraw.nonzero(as_tuple=True)[0], new_pos[redraw]] = redrawn.gather(1, src)[redraw]
        q = torch.where(seen[:, :, None], p_win.gather(1, src[:, :, None].expand(-1, -1, K)), q)
        a = new_a
        initialise(a, active[:, None] & ~seen & (a[:, None] + slots[:L] < bl))
    bar.close()

    if stats is not None:
        stats.forward_passes += sum(g.forward_passes for g in groups)
        stats.tokens += n * bl
        if isinstance(stats, SJDStats):
            stats.passes_per_image += passes.tolist()
            stats.tokens_per_pass.update(histogram)
    return body_ids(codes)


def sample_image_tokens_sjd(backbone, prompts: list[str], cfg: SamplingConfig, window: int = DEFAULT_WINDOW,
                            init: str = "random", progress: bool = False,
                            stats: SamplingStats | None = None) -> torch.Tensor:
    """Draws one image per prompt with SJD; returns codebook indices (B, rows, cols)."""
    body = sample_image_body_sjd(backbone, prompts, cfg, window, init, progress, stats)
    return backbone.layout.codes_from_body(body)
