"""Coupled re-drafting (MC-SJD): a new draft must be distributed as the new draft distribution, whatever
the old draft was drawn from, and equal to the old draft as often as the coupling promises."""

import pytest
import torch
from distributions import chi_square_p_value

from tokenbooth.sampling.coupling import COUPLINGS, gumbel_draw, gumbel_noise, maximal_coupling, redraft
from tokenbooth.sampling.processors import sample

K = 6
DRAWS = 60_000
ALPHA = 1e-4  # 9 fits below: a correct coupling fails this file with probability under 0.1%


def law_pair(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_old, q_new) over K codes. q_new is near q_old, as consecutive SJD passes are, and has a zero (top-k
    cuts a code the old law allowed)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, generator=g) * 1.5
    q_old = torch.softmax(logits, -1)
    q_new = torch.softmax(logits + 0.7 * torch.randn(K, generator=g), -1)
    q_new[q_new.argmin()] = 0.0
    q_new /= q_new.sum()
    if kind == "one-hot":  # init "above": a copied token, q = one-hot on it
        q_old = torch.zeros(K)
        q_old[q_new.argmax()] = 1.0
    elif kind == "uniform":  # init "random"
        q_old = torch.full((K,), 1.0 / K)
    return q_old, q_new


def old_and_new(coupling: str, q_old: torch.Tensor, q_new: torch.Tensor, seed: int, fn=redraft):
    """DRAWS independent (old, new) pairs: old ~ q_old as SJD drew it, new from the coupling."""
    g = torch.Generator().manual_seed(seed)
    q_old, q_new = q_old.expand(DRAWS, K), q_new.expand(DRAWS, K)
    noise = gumbel_noise((DRAWS, K), g) if coupling == "gumbel" else None
    old = gumbel_draw(q_old, noise) if coupling == "gumbel" else sample(q_old, g)
    return old, fn(coupling, old, q_old, q_new, noise, g)


@pytest.mark.parametrize("kind", ["spread", "one-hot", "uniform"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_every_coupling_draws_exactly_the_new_draft_distribution(coupling, kind):
    q_old, q_new = law_pair(kind, seed=COUPLINGS.index(coupling))
    _, new = old_and_new(coupling, q_old, q_new, seed=7)
    assert chi_square_p_value(torch.bincount(new, minlength=K), q_new) > ALPHA


def test_maximal_coupling_keeps_the_old_draft_as_often_as_any_coupling_can():
    for seed in range(3):
        q_old, q_new = law_pair("spread", seed)
        tv = float((q_old - q_new).abs().sum() / 2)
        kept = {c: float((lambda o, n: (o == n).double().mean())(*old_and_new(c, q_old, q_new, seed)))
                for c in COUPLINGS}
        assert abs(kept["maximal"] - (1 - tv)) < 0.01, (kept, tv)
        assert kept["gumbel"] > (1 - tv) / (1 + tv) - 0.01, (kept, tv)
        assert abs(kept["none"] - float(q_old @ q_new)) < 0.01, (kept, tv)
        assert kept["maximal"] >= kept["gumbel"] - 0.01 and kept["gumbel"] > kept["none"]


def redraw_from_q_new_after_a_miss(coupling, old, q_old, q_new, noise, g):
    """Looks like maximal coupling but draws a missed draft from q_new instead of the residual: the codes
    that q_new favours over q_old get drawn too often."""
    u = torch.rand(len(old), generator=g)
    keep = u * q_old.gather(1, old[:, None])[:, 0] < q_new.gather(1, old[:, None])[:, 0]
    return torch.where(keep, old, sample(q_new, g))


def keep_whatever_is_still_possible(coupling, old, q_old, q_new, noise, g):
    return torch.where(q_new.gather(1, old[:, None])[:, 0] > 0, old, sample(q_new, g))


@pytest.mark.parametrize("broken", [redraw_from_q_new_after_a_miss, keep_whatever_is_still_possible])
def test_the_check_catches_a_broken_coupling(broken):
    q_old, q_new = law_pair("spread", seed=0)
    _, new = old_and_new("maximal", q_old, q_new, seed=7, fn=broken)
    assert chi_square_p_value(torch.bincount(new, minlength=K), q_new) < 1e-9


def test_maximal_coupling_never_moves_a_draft_whose_law_did_not_change():
    q = torch.softmax(torch.randn(50, K), -1)
    old = sample(q, torch.Generator().manual_seed(0))
    assert torch.equal(maximal_coupling(old, q, q.clone(), torch.Generator().manual_seed(1)), old)


def test_sample_draws_each_code_with_its_probability_and_never_an_impossible_one():
    q = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    draws = sample(q.expand(DRAWS, K), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=K)
    assert counts[q == 0].sum() == 0 and chi_square_p_value(counts, q) > ALPHA
    assert sample(torch.empty(0, K), torch.Generator()).shape == (0,)
