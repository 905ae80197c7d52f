"""Coupled re-drafting for speculative Jacobi decoding (So et al. 2025, "MC-SJD: Maximal Coupling Speculative
Jacobi Decoding", arXiv 2510.24211, renamed "Speculative Coupled Decoding" in v2; the authors' code:
github.com/junhyukso/SCD, lumina1/scheduler/jacobi_iteration_lumina_mgpt_SCDMC.py and _GS.py).

After every SJD pass, each draft that was not verified (it lies past the pass's stopping point) gets a new
draft distribution q_new: this pass's p at its position. Plain SJD draws the new draft independently of the
old one, so the window's drafts keep changing although q_new is mostly close to the q_old they came from,
and a draft that changes invalidates what the model computed after it. A coupling draws the new draft from
q_new *and* as often as possible equal to the old one:

  none     independent: new ~ q_new.
  maximal  keep the old draft x with probability min(1, q_new(x) / q_old(x)), otherwise draw from
           norm(max(0, q_new - q_old)). This is speculative sampling's accept/residual step run on the
           drafts themselves; P(new == old) = 1 - TV(q_old, q_new), the most any coupling can reach. It is
           also what SJD-PAC (arXiv 2603.18599) calls adaptive continuation: its verification of the drafts
           past the first rejection, against this pass's (stale) p, keeps or replaces them by this very rule.
  gumbel   every body position owns one vector of exponential noise E for as long as it is drafted; each
           draft is argmax_z q(z) / E_z (the Gumbel-max trick: -log E is Gumbel). Old and new drafts share
           E, so they agree unless q moved enough to change the winner: P(new == old) >=
           (1 - TV) / (1 + TV) (Daliri et al. 2024, arXiv 2408.07978), with no residual to draw and no q_old
           to keep. Its drafts also come back when q does.

Why SJD stays lossless. The verifier accepts the draft x at body position k with probability
min(1, p_k(x) / q_k(x)) with a fresh uniform, else draws from norm(max(0, p_k - q_k)); the emitted token is
distributed as p_k exactly when, given everything the verifier conditions on (the accepted prefix, the drafts
and uniforms before k in this pass, and q_k itself), x is distributed as q_k. Call that set G_k; everything in
it is a function of randomness at positions before k, of q's at positions <= k, and of fresh draws.
  none     x is a fresh draw from q_k: independent of G_k given q_k.
  maximal  x = couple(x_old, q_old, q_k, fresh uniform, fresh residual draw). If x_old ~ q_old given G_k,
           then x ~ q_k given G_k: for every z, P(x = z) = min(q_old(z), q_k(z)) + P(reject) *
           norm(max(0, q_k - q_old))(z) = q_k(z). x_old ~ q_old given G_k by induction over passes: x_old was
           itself never verified (drafts are re-drawn only past the stopping point, and the walk never looks
           past it), and what G_k adds to the previous pass's conditioning set (the new q's at positions <= k,
           which the model computed from inputs before k, and fresh draws) tells nothing more about it. A
           one-hot q_old (init "above") is the degenerate case: x_old is known and the formula still gives q_k.
  gumbel   x = argmax q_k / E_k. E_k is drawn when position k enters the window and is used for nothing but
           position k's drafts, which only positions after k ever see (the model is causal, the walk stops at
           the first rejection, and residual and bonus tokens use their own draws). So E_k is independent of
           G_k, and the Gumbel-max trick gives x ~ q_k.
In every case the acceptance uniforms are fresh each pass. tests/test_coupling.py checks each coupling's draft
law, and tests/test_sjd.py the whole sampler's image law for every coupling; both catch two plausible-looking
broken couplings (a miss re-drawn from q_new instead of the residual; the old draft kept while still possible).
"""

from __future__ import annotations

import torch

from .processors import sample

COUPLINGS = ("none", "maximal", "gumbel")
DEFAULT_COUPLING = "maximal"


def redraft(coupling: str, old: torch.Tensor, q_old: torch.Tensor, q_new: torch.Tensor,
            noise: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """New drafts (N,) distributed as q_new (N, K), coupled with the old drafts `old` (N,) drawn from q_old.
    `noise` (N, K): each position's exponential noise, for gumbel only."""
    if coupling == "maximal":
        return maximal_coupling(old, q_old, q_new, generator)
    if coupling == "gumbel":
        return gumbel_draw(q_new, noise)
    return sample(q_new, generator)


def maximal_coupling(old: torch.Tensor, q_old: torch.Tensor, q_new: torch.Tensor,
                     generator: torch.Generator) -> torch.Tensor:
    """Keeps old[i] with probability min(1, q_new/q_old) at it, else draws from the residual."""
    at = old[:, None]
    u = torch.rand(len(old), generator=generator)
    keep = u * q_old.gather(1, at)[:, 0] < q_new.gather(1, at)[:, 0]  # written without dividing by q_old
    new = old.clone()
    moved = (~keep).nonzero()[:, 0]
    if len(moved):
        residual = (q_new[moved] - q_old[moved]).clamp(min=0)
        # q_new <= q_old everywhere only when they are equal (both sum to 1), and then the old draft is
        # always kept; the fallback only guards against rounding.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, q_new[moved])
        new[moved] = sample(residual, generator)
    return new


def gumbel_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """Exponential(1) noise E: argmax q / E is a draw from q (Gumbel-max with G = -log E)."""
    return torch.empty(shape).exponential_(generator=generator)


def gumbel_draw(q: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return (q / noise).argmax(-1)
