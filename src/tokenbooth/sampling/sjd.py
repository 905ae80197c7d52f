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

One pass in code (`sample_image_body_sjd`): `window_laws` (the forward pass and the processed p),
`Drafts.verify` (the accept/reject walk), `Drafts.fix_stop_token` (the residual or bonus token),
`forget_rejected` (the KV cache), `Drafts.advance` (redraws and new drafts for the next window).
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


class BodyPlan:
    """Where the structure tokens of an image body are: they are certain, so SJD never drafts them."""

    def __init__(self, layout):
        self.layout, self.length = layout, layout.body_length
        forced = [layout.forced_token(j) for j in range(self.length)]
        self.structure_ids = torch.tensor([-1 if t is None else t for t in forced])
        self.is_structure = ~layout.image_positions()
        # image_tokens_before[j]: image positions before body position j (j = length: all of them)
        self.image_tokens_before = torch.cat([torch.zeros(1, dtype=torch.long), (~self.is_structure).long().cumsum(0)])

    def structure_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Whether each position holds a structure token (positions past the end count as the last)."""
        return self.is_structure[positions.clamp(max=self.length - 1)]

    def skip_structure(self, positions: torch.Tensor) -> torch.Tensor:
        """Each position moved forward past the structure tokens it stands on."""
        while True:
            step = (positions < self.length) & self.structure_at(positions)
            if not step.any():
                return positions
            positions = positions + step.long()

    def token_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, length) codes (ignored at structure positions) -> the body's vocabulary ids."""
        return torch.where(self.is_structure, self.structure_ids, self.layout.token_ids(codes))


@dataclass
class Verdict:
    """One pass's accept/reject walk over every image's window."""

    laws: torch.Tensor  # (images, window + 1, K): the processed law at each window slot and one past it
    accepted_drafts: torch.Tensor  # (images,) drafts accepted before the first rejection
    stop: torch.Tensor  # (images,) body position of the corrected or bonus token
    rejected: torch.Tensor  # (images,) a draft was rejected inside the body: stop takes a residual token
    complete: torch.Tensor  # (images,) the whole window was accepted: stop takes a bonus token


class Drafts:
    """The bodies being drawn, as codebook indices: each image's accepted prefix (up to `accepted`), then a
    window of drafts, each with the law q it was drawn from."""

    def __init__(self, plan: BodyPlan, images: int, window: int, init: str, generator: torch.Generator):
        self.plan, self.window, self.init, self.generator = plan, window, init, generator
        self.n_codes = plan.layout.codebook_size
        self.codes = torch.zeros(images, plan.length, dtype=torch.long)
        self.q = torch.empty(images, window, self.n_codes)  # q[r, k]: the law of codes[r, accepted[r] + k]
        self.offsets = torch.arange(window + 1)  # window slots, and the one past it
        self.accepted = plan.skip_structure(torch.zeros(images, dtype=torch.long))  # body positions fixed
        self.draw_new(torch.ones(images, window, dtype=torch.bool))

    def unfinished(self) -> torch.Tensor:
        return self.accepted < self.plan.length

    def draw_new(self, fresh: torch.Tensor) -> None:
        """New drafts for the window slots with fresh[r, k] (positions accepted[r] + k), in slot order so that
        `above` can copy a draft made in the same call (see the module docstring for the two inits)."""
        images = torch.arange(len(self.codes))
        uniform = torch.full((self.n_codes,), 1.0 / self.n_codes)
        row = self.plan.layout.row_length
        for k in range(self.window):
            pos = (self.accepted + k).clamp(max=self.plan.length - 1)
            drawn = torch.randint(self.n_codes, (len(images),), generator=self.generator)
            rows = fresh[:, k]
            if self.init == "above":
                has_above = rows & (pos >= row)
                chosen = torch.where(has_above, self.codes[images, (pos - row).clamp(min=0)], drawn)
                self.q[rows, k] = torch.where(has_above[rows, None], F.one_hot(chosen[rows], self.n_codes).float(),
                                              uniform)
            else:
                chosen = drawn
                self.q[rows, k] = uniform
            self.codes[rows, pos[rows]] = chosen[rows]

    def verify(self, p: torch.Tensor, first: int, accept) -> Verdict:
        """Speculative sampling's walk over each window: draft x at slot k is accepted with probability
        min(1, p(x) / q(x)) (`accept`), structure tokens always; the walk stops at the first rejection.
        p: (images, T, K) processed laws of body positions first .. first + T - 1."""
        length, window = self.plan.length, self.window
        positions = self.accepted[:, None] + self.offsets
        laws = p.gather(1, (positions - first).clamp(0, p.shape[1] - 1)[:, :, None].expand(-1, -1, self.n_codes))
        drafts = self.codes.gather(1, positions[:, :window].clamp(max=length - 1))
        u = torch.rand(len(drafts), window, generator=self.generator)
        p_x = laws[:, :window].gather(2, drafts[:, :, None])[:, :, 0]
        q_x = self.q.gather(2, drafts[:, :, None])[:, :, 0]
        ok = accept(p_x, q_x, u) | self.plan.structure_at(positions[:, :window])
        ok &= positions[:, :window] < length
        accepted_drafts = ok.long().cumprod(1).sum(1)
        stop = self.accepted + accepted_drafts
        in_body = self.unfinished() & (stop < length)
        return Verdict(laws, accepted_drafts, stop, rejected=in_body & (accepted_drafts < window),
                       complete=in_body & (accepted_drafts == window))

    def fix_stop_token(self, v: Verdict) -> None:
        """The token where the walk stopped: from the residual norm(max(0, p - q)) after a rejection, from p
        one past the window after a complete one."""
        at_stop = torch.arange(len(self.codes)), v.accepted_drafts.clamp(max=self.window - 1)
        residual = (v.laws[at_stop] - self.q[at_stop]).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, v.laws[at_stop])  # p == q: none left
        law = torch.where(v.rejected[:, None], residual, v.laws[:, self.window])
        token = torch.multinomial(law, 1, generator=self.generator)[:, 0]
        sets = (v.rejected | v.complete) & ~self.plan.structure_at(v.stop)
        self.codes[sets, v.stop[sets]] = token[sets]

    def advance(self, v: Verdict) -> torch.Tensor:
        """Moves every unfinished image past its accepted drafts and stop token, and refills its window:
        drafts this pass saw are redrawn from this pass's p (which becomes their q), the others are new.
        Returns the image tokens each image fixed in this pass."""
        redrawn = torch.multinomial(v.laws.reshape(-1, self.n_codes), 1, generator=self.generator)
        redrawn = redrawn.reshape(len(self.codes), self.window + 1)
        active = self.unfinished()
        moved = self.plan.skip_structure(v.stop + (v.rejected | v.complete).long())
        new_accepted = torch.where(active, moved, self.accepted)
        fixed = self.plan.image_tokens_before[new_accepted] - self.plan.image_tokens_before[self.accepted]

        slot_seen = new_accepted[:, None] + self.offsets[: self.window] - self.accepted[:, None]  # > window: unseen
        seen = (slot_seen <= self.window) & active[:, None]
        slot_seen = slot_seen.clamp(max=self.window)
        in_body = new_accepted[:, None] + self.offsets[: self.window] < self.plan.length
        redraw = seen & in_body
        positions = (new_accepted[:, None] + self.offsets[: self.window]).clamp(max=self.plan.length - 1)
        self.codes[redraw.nonzero(as_tuple=True)[0], positions[redraw]] = redrawn.gather(1, slot_seen)[redraw]
        self.q = torch.where(seen[:, :, None], v.laws.gather(1, slot_seen[:, :, None].expand(-1, -1, self.n_codes)),
                             self.q)
        self.accepted = new_accepted
        self.draw_new(active[:, None] & ~seen & in_body)
        return fixed


def window_laws(groups, drafts: Drafts, cfg: SamplingConfig) -> tuple[torch.Tensor, int]:
    """One forward pass over every image's window with the drafts in place: the processed law (CFG, top-k,
    temperature, top-p, exactly the plain sampler's) at each body position from the earliest window start
    to the furthest window end. Returns (images, T, K) and the first position."""
    plan, n = drafts.plan, len(drafts.codes)
    active = drafts.unfinished()
    first = int(drafts.accepted.min())
    last = int(torch.clamp(drafts.accepted + drafts.window, max=plan.length - 1)[active].max())
    body = plan.token_ids(drafts.codes)
    logits = torch.cat([g.body_logits(body, first, last) for g in groups])  # (rows, T, K)
    k = logits.shape[-1]
    uncond = logits[n:].reshape(-1, k) if cfg.cfg_scale != 1.0 else None  # guidance_batches put them after
    return image_token_distribution(logits[:n].reshape(-1, k), uncond, cfg).reshape(n, -1, k), first


def forget_rejected(groups, drafts: Drafts, v: Verdict) -> None:
    """The KV caches keep only positions whose fed token survived: those before each image's stop."""
    survived = torch.where(drafts.unfinished(), v.stop, torch.full_like(v.stop, drafts.plan.length))
    for g in groups:
        g.forget_from(int(survived.min()))


def sample_image_body_sjd(backbone, prompts: list[str], cfg: SamplingConfig, window: int = DEFAULT_WINDOW,
                          init: str = "random", progress: bool = False, stats: SamplingStats | None = None,
                          _accept=speculative_accept) -> torch.Tensor:
    """Draws one image block per prompt with SJD; returns its vocabulary ids after the header
    (B, body_length), distributed as `sample_image_body`'s. `_accept` is for tests only (a broken rule must
    make the distribution test fail)."""
    cfg.validate()
    plan = BodyPlan(backbone.layout)
    check_sjd_options(window, init, plan.length)
    n = len(prompts)
    groups = guidance_batches(backbone, prompts, cfg,
                              lambda prefixes, copies: DraftBatch(backbone, prefixes, cfg.kv_cache, plan.length, copies))
    drafts = Drafts(plan, n, window, init, torch.Generator().manual_seed(cfg.seed))
    passes, histogram = torch.zeros(n, dtype=torch.long), Counter()
    bar = _progress(n * plan.length, progress)
    bar.update(int(drafts.accepted.sum()))
    while drafts.unfinished().any():
        active, before = drafts.unfinished(), drafts.accepted
        verdict = drafts.verify(*window_laws(groups, drafts, cfg), _accept)
        drafts.fix_stop_token(verdict)
        forget_rejected(groups, drafts, verdict)
        fixed = drafts.advance(verdict)
        passes += active.long()
        histogram.update(fixed[active].tolist())
        bar.update(int((drafts.accepted - before).sum()))
    bar.close()

    if stats is not None:
        stats.forward_passes += sum(g.forward_passes for g in groups)
        stats.tokens += n * plan.length
        if isinstance(stats, SJDStats):
            stats.passes_per_image += passes.tolist()
            stats.tokens_per_pass.update(histogram)
    return plan.token_ids(drafts.codes)


def sample_image_tokens_sjd(backbone, prompts: list[str], cfg: SamplingConfig, window: int = DEFAULT_WINDOW,
                            init: str = "random", progress: bool = False,
                            stats: SamplingStats | None = None) -> torch.Tensor:
    """Draws one image per prompt with SJD; returns codebook indices (B, rows, cols)."""
    body = sample_image_body_sjd(backbone, prompts, cfg, window, init, progress, stats)
    return backbone.layout.codes_from_body(body)
