"""Speculative Jacobi Decoding (Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with
Training-free Speculative Jacobi Decoding"), with coupled re-drafting (So et al. 2025, MC-SJD, coupling.py):
the images `sample_image_body` draws, in fewer forward passes.

Each pass feeds, for every image, its last fixed token and a window of L drafts after it, and gets the
processed distribution p (CFG, structure rules, top-k, temperature, top-p: exactly the plain sampler's) at
every window position and one past it. Walking the window left to right, draft x is accepted with
probability min(1, p(x) / q(x)), q being the distribution x was drawn from; the first rejected position
takes a token from norm(max(0, p - q)) and ends the walk. That is speculative sampling's accept/reject step,
so every token that leaves the window is distributed exactly as plain sampling would draw it. If the whole
window is accepted, the distribution one past it is exact too and gives a bonus token. Drafts past the stop
get this pass's p as their new q and are re-drawn from it, coupled with their old value (coupling.py, which
also argues why that stays lossless); positions new to the window are initialised.

Initialising a new draft position (`init`):
  random  a uniform image token, q = uniform over the K image codes: its true law. (The paper's one-hot q is
          exact as well, see `above`, but accepts with probability sum_x p(x)/K instead of
          sum_x min(p(x), 1/K), which is never larger.)
  above   the token one image row up, q = one-hot on it. With a one-hot q the test accepts x with p(x) and the
          residual is p without x, renormalised: together exactly p, whatever x is and however it was chosen.
          The first row has nothing above and falls back to random.

Proactive drafting (`proactive` = D, after Kang et al. 2026, SJD-PAC, arXiv 2603.18599, whose tree of
candidates this is one cheap branch of). About half of all passes fix a single token: the first draft is
rejected, and the token drawn in its place differs from the draft that every later position was computed
after. A third of the time (on mini) the token drawn is the one just before it, the last fixed token: images
repeat codes. So each pass also feeds a branch beside the window: that token again at the window's first D
positions (structure tokens where the layout puts them), in columns that see only the fixed tokens and the
branch. When the walk stops at the first position and the token it drew there is the branch's, the branch's
outputs are the exact laws that follow, and the walk goes on along the branch: each further repeat is a
one-hot draft (accepted with p(x), else replaced by a draw from p without x: exactly p, as for `above`), and
one fresh token from the last law reached ends the pass. Why the law is unchanged: the first token is chosen
exactly as without the branch (accept, or draw from the residual); the branch only decides whether the laws
after it are already at hand, and they are exact because the branch saw exactly the fixed tokens and the
tokens then fixed, at their positions. Its repeats are a function of the fixed tokens, and its tests use
fresh uniforms. The window's drafts at those positions are not looked at; past the stop they are re-drawn as
after any stop (coupling.py). The taken branch's keys and values move into the cache (`adopt_branch`).

Adaptive continuation (SJD-PAC's other half: after the first rejection, keep each later draft with
probability min(1, p/q) against the stale p, else draw from norm(max(0, p - q))) is, token for token, the
maximal coupling below (coupling.py): it continues the *drafts* past a rejection, not the fixed tokens, which
need the model's law after the token actually chosen. tokenbooth has had it as `coupling="maximal"` since
MC-SJD; there is nothing to add.

Structure tokens (row ends, image end) are certain: they sit in the window like any token and are always
accepted.

Batches: every image advances on its own. Each keeps its own window position and its own rows of the KV
cache (sampler.py's `RaggedBatch`), so one forward pass serves images that are at different places, and an
image that is done leaves the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UserError
from .coupling import COUPLINGS, gumbel_draw, gumbel_noise, redraft
from .processors import SamplingConfig, image_token_distribution, sample
from .sampler import RaggedBatch, SamplingStats, _progress, guidance_batches

INITS = ("random", "above")


@dataclass
class SJDStats(SamplingStats):
    passes_per_image: list[int] = field(default_factory=list)  # passes each image took part in until done
    # image tokens one image fixed in one pass (its accepted drafts plus the corrected or bonus token) -> count
    tokens_per_pass: Counter = field(default_factory=Counter)

    def add(self, other: "SJDStats") -> None:
        super().add(other)
        self.passes_per_image.extend(other.passes_per_image)
        self.tokens_per_pass.update(other.tokens_per_pass)

    @property
    def mean_tokens_per_pass(self) -> float:
        total = sum(self.tokens_per_pass.values())
        return sum(k * v for k, v in self.tokens_per_pass.items()) / total if total else 0.0


def check_sjd_options(window: int, init: str, coupling: str, body_length: int | None = None,
                      proactive: int = 0) -> None:
    if init not in INITS:
        raise UserError(f"--sjd-init must be one of {', '.join(INITS)} (got {init!r})")
    if coupling not in COUPLINGS:
        raise UserError(f"--sjd-coupling must be one of {', '.join(COUPLINGS)} (got {coupling!r})")
    if window < 1 or (body_length is not None and window > body_length):
        upper = f" and at most the image body's {body_length} tokens" if body_length is not None else ""
        raise UserError(f"--sjd-window must be at least 1{upper} (got {window})")
    if isinstance(proactive, bool) or not isinstance(proactive, int) or proactive < 0 or \
            (body_length is not None and proactive > body_length):
        raise UserError(f"--sjd-proactive must be a whole number from 0 (off) to the image body's length "
                        f"(got {proactive!r})")


def speculative_accept(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p/q); u is uniform in [0, 1). Written without the division so that
    q(x) = 0 (never drawn, but kept safe) accepts whenever p(x) > 0."""
    return u * q_x < p_x


def one_hot_residual(law: torch.Tensor, token: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Where a one-hot draft `token` was rejected, the law to draw from instead: `law` without it (the
    rejection happens with probability 1 - law(token), so the two together give exactly `law`)."""
    without = law.scatter(1, token[:, None], 0.0)
    return torch.where(rejected[:, None] & (without.sum(-1, keepdim=True) > 0), without, law)


def take_branch(sampler: "Sampler", w: "Window", accepted: torch.Tensor, p_first: torch.Tensor,
                p_branch: torch.Tensor, run: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """The proactive branch after the walk. Where the walk stopped at the first position and drew the run's
    token there, the branch's laws are exact: its further tokens (the same token again, one-hot drafts) are
    verified against them (accept with p(x), else draw from p without x: together exactly p), and one fresh
    token ends it. Returns how many of the branch's columns hold fixed tokens (0: not taken). `p_first` is
    the law at the first position (unused here; a broken variant in the tests uses it)."""
    bl, depth = sampler.bl, p_branch.shape[1]
    first = w.last + 1
    took = eligible & (accepted == 0) & (w.codes.gather(1, first.clamp(max=bl - 1)[:, None])[:, 0] == run)
    if not took.any():
        return torch.zeros_like(accepted)
    img = took.nonzero()[:, 0]
    pos = first[img, None] + torch.arange(1, depth)  # the branch's further positions
    at = pos.clamp(max=bl - 1)
    laws = p_branch[img]  # (n, depth, K): the law after each branch token
    p_x = laws[:, :-1].gather(2, run[img, None, None].expand(-1, depth - 1, 1))[:, :, 0]
    u = torch.rand(p_x.shape, generator=sampler.generator)
    ok = ((u < p_x) | sampler.forced[at]) & (pos < bl)
    further = ok.long().cumprod(1).sum(1)
    stop = first[img] + 1 + further
    law = laws[torch.arange(len(img)), further]
    law = one_hot_residual(law, run[img], rejected=further < depth - 1)
    kept, step = (torch.arange(1, depth) <= further[:, None]).nonzero(as_tuple=True)
    w.codes[img[kept], pos[kept, step]] = run[img[kept]]
    emit = (stop < bl) & ~sampler.forced[stop.clamp(max=bl - 1)]
    w.codes[img[emit], stop[emit]] = sample(law[emit], sampler.generator)
    taken = torch.zeros_like(accepted)
    taken[img] = 1 + further
    return taken


# --- the drafts ---------------------------------------------------------------------------------------------

@dataclass
class Window:
    """Per image: body codes (fixed tokens and drafts), `last` = the last body position whose token is fixed
    and fed (-1: none yet, the header's last token), and per window slot s (body position last + 1 + s) the
    law q its draft was drawn from and, for the gumbel coupling, the position's noise."""
    codes: torch.Tensor  # (images, body_length)
    last: torch.Tensor  # (images,)
    q: torch.Tensor  # (images, L, K)
    noise: torch.Tensor | None  # (images, L, K)

    def take(self, images: torch.Tensor) -> "Window":
        return Window(self.codes[images], self.last[images], self.q[images],
                      None if self.noise is None else self.noise[images])


class Sampler:
    """One SJD run's fixed parts: the layout's structure, the settings, the random stream."""

    def __init__(self, layout, cfg: SamplingConfig, accept, redraft_fn):
        self.bl, self.K, self.R, self.L = layout.body_length, layout.codebook_size, layout.row_length, cfg.sjd_window
        self.init, self.coupling, self.proactive = cfg.sjd_init, cfg.sjd_coupling, cfg.sjd_proactive
        self.forced_ids = torch.tensor([-1 if layout.forced_token(j) is None else layout.forced_token(j)
                                        for j in range(self.bl)])
        self.forced = self.forced_ids >= 0
        self.images_before = torch.cat([torch.zeros(1, dtype=torch.long), (~self.forced).long().cumsum(0)])
        # an image is done once its last image token is fixed: the structure tokens after it need no pass
        self.done_after = int((~self.forced).nonzero().max())
        self.layout, self.accept, self.redraft = layout, accept, redraft_fn
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def ids(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids at body positions (images, n) of `codes`; positions past the body read the last."""
        at = positions.clamp(0, self.bl - 1)
        return torch.where(self.forced[at], self.forced_ids[at], self.layout.token_ids(codes.gather(1, at)))

    def start(self, images: int) -> Window:
        w = Window(torch.zeros(images, self.bl, dtype=torch.long), torch.full((images,), -1),
                   torch.empty(images, self.L, self.K),
                   gumbel_noise((images, self.L, self.K), self.generator) if self.coupling == "gumbel" else None)
        self.initialise(w, torch.ones(images, self.L, dtype=torch.bool))
        return w

    def initialise(self, w: Window, new: torch.Tensor) -> None:
        """First drafts for the slots marked `new` (images, L): uniform (or copied from the row above)."""
        slots = self.L
        pos = w.last[:, None] + 1 + torch.arange(slots)
        new = new & (pos < self.bl)
        img, s = new.nonzero(as_tuple=True)
        if w.noise is not None:  # the gumbel draw from the uniform law, so later draws couple with it
            drawn = w.noise[img, s].argmin(-1)
        else:
            drawn = torch.randint(self.K, (len(img),), generator=self.generator)
        w.codes[img, pos[img, s]] = drawn
        w.q[img, s] = 1.0 / self.K
        if self.init == "above":
            # Row by row, so a copy can come from a draft made a row earlier in this same call.
            for level in range(0, slots, self.R):
                first_new = torch.where(new, torch.arange(slots), slots).min(1).values
                this = new & (torch.arange(slots) >= first_new[:, None] + level) & \
                    (torch.arange(slots) < first_new[:, None] + level + self.R) & (pos >= self.R)
                img, s = this.nonzero(as_tuple=True)
                copy = w.codes[img, pos[img, s] - self.R]
                w.codes[img, pos[img, s]] = copy
                w.q[img, s] = F.one_hot(copy, self.K).float()

    def distributions(self, logits: torch.Tensor, images: int, cfg: SamplingConfig) -> torch.Tensor:
        """(rows, slots, K) logits, conditional rows first -> (images, slots, K) processed p."""
        slots = logits.shape[1]
        guided = logits.shape[0] > images
        cond = logits[:images].reshape(-1, self.K)
        uncond = logits[images:].reshape(-1, self.K) if guided else None
        return image_token_distribution(cond, uncond, cfg).reshape(images, slots, self.K)

    def verify(self, w: Window, p: torch.Tensor) -> torch.Tensor:
        """Walks each window, fixes the token where the walk stops; returns how many drafts were accepted."""
        L, bl = self.L, self.bl
        ar = torch.arange(len(w.last))
        pos = w.last[:, None] + 1 + torch.arange(L)
        at = pos.clamp(max=bl - 1)
        x = w.codes.gather(1, at)
        p_x = p[:, :L].gather(2, x[:, :, None])[:, :, 0]
        q_x = w.q.gather(2, x[:, :, None])[:, :, 0]
        u = torch.rand(x.shape, generator=self.generator)
        ok = (self.accept(p_x, q_x, u) | self.forced[at]) & (pos < bl)
        accepted = ok.long().cumprod(1).sum(1)

        # One fresh token where the walk stopped: the residual after a rejection, p itself past a full window.
        stop = w.last + 1 + accepted
        emit = (stop < bl) & ~self.forced[stop.clamp(max=bl - 1)]
        p_stop = p[ar, accepted]
        residual = (p_stop - w.q[ar, accepted.clamp(max=L - 1)]).clamp(min=0)
        law = torch.where((accepted < L)[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p_stop)
        w.codes[ar[emit], stop[emit]] = sample(law[emit], self.generator)
        return accepted

    def advance(self, w: Window, p: torch.Tensor, accepted: torch.Tensor) -> None:
        """Moves each window past its stop. A slot whose position the pass saw gets that position's p as its
        new q and a draft from it: coupled with its old draft where it had one, a fresh one past the window.
        Slots new to the window are initialised."""
        L, K, bl = self.L, self.K, self.bl
        w.last = w.last + 1 + accepted
        old = (accepted + 1)[:, None] + torch.arange(L)  # the slot each new slot's position had in this pass
        pos = w.last[:, None] + 1 + torch.arange(L)
        live = (pos < bl) & ~self.forced[pos.clamp(max=bl - 1)]
        q_old, noise_old = w.q, w.noise
        w.q = p.gather(1, old.clamp(max=L)[:, :, None].expand(-1, -1, K))
        if noise_old is not None:  # a position keeps its noise while it stays in the window
            w.noise = noise_old.gather(1, old.clamp(max=L - 1)[:, :, None].expand(-1, -1, K))
            fresh = old >= L
            w.noise[fresh] = gumbel_noise((int(fresh.sum()), K), self.generator)

        coupled = live & (old < L)
        img, s = coupled.nonzero(as_tuple=True)
        at = pos[img, s]
        o = old[img, s]
        w.codes[img, at] = self.redraft(self.coupling, w.codes[img, at], q_old[img, o], w.q[img, s],
                                        None if w.noise is None else w.noise[img, s], self.generator)
        img, s = (live & (old == L)).nonzero(as_tuple=True)  # one past the window: p but no draft yet
        w.codes[img, pos[img, s]] = (gumbel_draw(w.q[img, s], w.noise[img, s]) if w.noise is not None
                                     else sample(w.q[img, s], self.generator))
        self.initialise(w, old > L)

    def branch(self, w: Window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The proactive branch of each window: its token (the last fixed token's code, to be repeated), the
        vocabulary ids it feeds at the window's first `proactive` positions (structure tokens where the layout
        puts them), and whether it can pay (the last fixed token and the first position are image tokens, and
        a body position follows). Where it cannot, the first draft stands in: never taken, since a rejected
        draft is never what the residual draws."""
        bl = self.bl
        first = (w.last + 1).clamp(max=bl - 1)
        last = w.last.clamp(min=0)
        eligible = (w.last >= 0) & ~self.forced[last] & ~self.forced[first] & (w.last + 2 < bl)
        run = torch.where(eligible, w.codes.gather(1, last[:, None])[:, 0], w.codes.gather(1, first[:, None])[:, 0])
        at = (w.last[:, None] + 1 + torch.arange(self.proactive)).clamp(max=bl - 1)
        ids = torch.where(self.forced[at], self.forced_ids[at], self.layout.token_ids(run)[:, None])
        return run, ids, eligible

    def fixed_tokens(self, last_before: torch.Tensor, last_after: torch.Tensor) -> torch.Tensor:
        """Image tokens fixed between two values of `last`."""
        return self.images_before[(last_after + 1).clamp(max=self.bl)] - self.images_before[last_before + 1]


def sample_image_body_sjd(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
                          stats: SamplingStats | None = None, _accept=speculative_accept,
                          _redraft=redraft, _branch=take_branch) -> torch.Tensor:
    """Draws one image block per prompt with SJD (cfg.sjd_window, sjd_init, sjd_coupling); returns its
    vocabulary ids after the header (B, body_length), distributed as `sample_image_body`'s. `_accept`,
    `_redraft` and `_branch` are for tests only (a broken rule must make the distribution test fail)."""
    cfg.validate()
    layout = backbone.layout
    check_sjd_options(cfg.sjd_window, cfg.sjd_init, cfg.sjd_coupling, layout.body_length, cfg.sjd_proactive)
    L, bl, n = cfg.sjd_window, layout.body_length, len(prompts)
    groups = guidance_batches(backbone, prompts, cfg, lambda prefixes, copies: RaggedBatch(
        backbone, prefixes, cfg.kv_cache, bl + L + 1 + cfg.sjd_proactive, copies))
    s = Sampler(layout, cfg, _accept, _redraft)

    window = s.start(n)
    alive = torch.arange(n)  # the images still drawing, in the groups' row order
    codes = torch.zeros(n, bl, dtype=torch.long)
    passes = torch.zeros(n, dtype=torch.long)
    histogram = Counter()
    bar = _progress(n * bl, progress)
    while len(alive):
        # The last fixed token and the drafts after it; near the end of the body only as many as the image
        # furthest from its end can use (slots past the body are never accepted: their p is never read).
        slots = min(L, int((bl - 1 - window.last).max())) + 1
        ids = s.ids(window.codes, window.last[:, None] + torch.arange(slots))
        run, branch_ids, eligible = s.branch(window) if s.proactive else (None, None, None)
        logits = [g.window_logits(ids, window.last, slots, branch_ids) for g in groups]
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        p = s.distributions(logits, len(alive), cfg)
        p_window = torch.cat([p[:, :slots], p.new_full((len(alive), L + 1 - slots, s.K), 1.0 / s.K)], dim=1)
        before = window.last
        accepted = s.verify(window, p_window)
        if run is not None:
            taken = _branch(s, window, accepted, p[:, 0], p[:, slots:], run, eligible)
            for g in groups:
                g.adopt_branch(taken, window.last, slots, branch_ids)
            accepted = accepted + taken  # the walk went on along the branch: it ends that much further
        s.advance(window, p_window, accepted)
        for g in groups:
            g.keep(window.last)
        passes[alive] += 1
        histogram.update(s.fixed_tokens(before, window.last).tolist())
        done = window.last >= s.done_after
        bar.update(int((torch.where(done, bl - 1, window.last) - before).sum()))
        if done.any():
            codes[alive[done]] = window.codes[done]
            alive, window = alive[~done], window.take(~done)
            for g in groups:
                g.select(~done)
    bar.close()

    if stats is not None:
        stats.forward_passes += sum(g.forward_passes for g in groups)
        stats.tokens += n * bl
        if isinstance(stats, SJDStats):
            stats.passes_per_image += passes.tolist()
            stats.tokens_per_pass.update(histogram)
    return s.ids(codes, torch.arange(bl).expand(n, bl))


def sample_image_tokens_sjd(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
                            stats: SamplingStats | None = None) -> torch.Tensor:
    """Draws one image per prompt with SJD; returns codebook indices (B, rows, cols)."""
    body = sample_image_body_sjd(backbone, prompts, cfg, progress, stats)
    return backbone.layout.codes_from_body(body)
