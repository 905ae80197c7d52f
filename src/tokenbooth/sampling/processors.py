"""From raw logits to the distribution an image token is drawn from, in Lumina-mGPT's order:
classifier-free guidance, then the structure rules, then image top-k, then temperature and top-p.

Structure tokens (row ends, image end) sit at positions the layout fixes, so the sampler writes them
without asking the model; at every other position only image tokens are allowed, which is the same as
suppressing all other logits: the backbone's `image_head` scores the image codes alone, in codebook order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..backbones.families import family_defaults
from ..errors import UserError


@dataclass(kw_only=True)
class SamplingConfig:
    # No defaults for the two settings that differ per family: they come from backbones/families.py
    # (`SamplingConfig.for_family`), or the caller names them.
    cfg_scale: float  # classifier-free guidance; 1.0 = no guidance, 0.0 = unconditional
    image_top_k: int  # image top-k, clipped to the codebook size
    top_p: float = 1.0  # 1.0 = off
    temperature: float = 1.0  # < 1.0 = less random
    seed: int = 0
    kv_cache: bool = True  # reuse past keys/values instead of re-running the whole prefix each step
    batched_cfg: bool = True  # conditional and unconditional rows in one forward pass
    sampler: str = "plain"  # "plain", or "sjd": speculative Jacobi decoding, same distribution, fewer passes
    sjd_window: int = 16  # draft tokens per SJD pass (the SJD paper's window length)
    # how SJD fills new draft positions: the token "above" (one image row up) or a "random" image token; on mini
    # "above" gives slightly more tokens per pass (benchmarks/results/sjd.json)
    sjd_init: str = "above"
    # how SJD re-draws a draft it could not verify yet: "none" (independently), "maximal" or "gumbel" (coupled
    # with the old draft, MC-SJD: the same law, the old token kept as often as possible; sampling/coupling.py)
    sjd_coupling: str = "maximal"
    # proactive drafting (after SJD-PAC): a branch of this many tokens beside the window, the last fixed token
    # repeated, so a pass whose first draft is rejected in favour of that token goes on along it; 0 = off.
    # The same law, more tokens per pass (sjd.py); on mini the first token of the branch pays most per column
    sjd_proactive: int = 1

    @classmethod
    def for_family(cls, family: str, **overrides) -> "SamplingConfig":
        """The family's sampling defaults (backbones/families.py), with `overrides` on top."""
        return cls(**{**family_defaults(family).sample, **overrides})

    def validate(self) -> None:
        check_sampling_values(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)

    def distribution(self) -> dict:
        """The settings that shape the distribution images are drawn from (what an adapter records)."""
        return {name: getattr(self, name) for name in DISTRIBUTION}


DISTRIBUTION = ("cfg_scale", "image_top_k", "top_p", "temperature")
# setting: (its flag, the test a value must pass, what the test says)
LIMITS = {
    "cfg_scale": ("--cfg", lambda v: v >= 0, ">= 0"),
    "image_top_k": ("--top-k", lambda v: v >= 1, ">= 1"),
    "top_p": ("--top-p", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "temperature": ("--temperature", lambda v: v > 0, "> 0"),
}


def check_sampling_values(values: dict) -> None:
    """Refuses out-of-range or non-finite settings; takes any subset of SamplingConfig's fields (None = not
    given), so a command can check its flags before it loads a model."""
    for name, (flag, ok, rule) in LIMITS.items():
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise UserError(f"{flag} must be a finite number {rule} (got {value!r})")


def guide(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def image_token_distribution(cond_logits: torch.Tensor, uncond_logits: torch.Tensor | None,
                             cfg: SamplingConfig) -> torch.Tensor:
    """(B, K) image-code logits (a backbone's `image_head`) -> (B, K) probabilities, codebook order."""
    logits = guide(cond_logits, uncond_logits, cfg.cfg_scale)
    k = min(cfg.image_top_k, logits.shape[-1])
    if k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        probs = _nucleus(probs, cfg.top_p)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row of probs (N, K), by inverting the cumulative sum: a single uniform per row and a binary
    search, several times cheaper than torch.multinomial on small rows. A code of probability 0 is never drawn
    (its cumulative sum equals its predecessor's, and the search returns the first sum above the uniform)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (the top token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)
