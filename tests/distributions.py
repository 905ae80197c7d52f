"""Goodness-of-fit checks shared by the sampler tests."""

from __future__ import annotations

import torch


def chi_square_p_value(counts: torch.Tensor, law: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit of counts to law; cells expected below `min_expected` are pooled (and the pool joins
    the smallest other cell if it is still that small). An impossible outcome observed gives 0."""
    counts, law = counts.double(), law.double()
    if counts[law == 0].sum() > 0:
        return 0.0
    expected = law * counts.sum()
    small = expected < min_expected
    obs, exp = list(counts[~small]), list(expected[~small])
    pool_obs, pool_exp = counts[small].sum(), expected[small].sum()
    if pool_exp > 0:
        if pool_exp < min_expected:
            i = min(range(len(exp)), key=lambda k: exp[k])
            obs[i], exp[i] = obs[i] + pool_obs, exp[i] + pool_exp
        else:
            obs.append(pool_obs)
            exp.append(pool_exp)
    if len(obs) < 2:
        return 1.0  # one possible outcome, and only it was seen
    obs, exp = torch.stack(obs), torch.stack(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2))
