"""The one way to sample: prompts and a SamplingConfig in, images and statistics out.

The config names the sampler (plain, or speculative Jacobi decoding with its options); generate, the demo,
the benchmarks, DreamBench, toy-bench and the web app all come through here, so a faster sampler lands
everywhere at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import UserError
from .processors import SamplingConfig
from .sampler import SamplingStats, sample_image_tokens

SAMPLERS = ("plain", "sjd")


@dataclass
class Drawing:
    codes: torch.Tensor  # (B, rows, cols) codebook indices
    images: list  # PIL images, one per prompt
    stats: SamplingStats  # forward passes, tokens (and for SJD the accepted tokens per pass)
    seconds: float


def check_sampler(cfg: SamplingConfig, body_length: int | None = None) -> None:
    from .sjd import check_sjd_options

    if cfg.sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {cfg.sampler!r})")
    if cfg.sampler == "sjd":
        check_sjd_options(cfg.sjd_window, cfg.sjd_init, cfg.sjd_coupling, body_length)


def draw_codes(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
               stats: SamplingStats | None = None) -> torch.Tensor:
    """One image per prompt as codebook indices (B, rows, cols), with the sampler the config names."""
    cfg.validate()
    check_sampler(cfg, backbone.layout.body_length)
    if cfg.sampler == "sjd":
        from .sjd import sample_image_tokens_sjd

        return sample_image_tokens_sjd(backbone, prompts, cfg, progress=progress, stats=stats)
    return sample_image_tokens(backbone, prompts, cfg, progress=progress, stats=stats)


def draw(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False) -> Drawing:
    """One image per prompt, decoded to pictures."""
    from ..vq import tensor_to_pil
    from .sjd import SJDStats

    stats = SJDStats() if cfg.sampler == "sjd" else SamplingStats()
    t0 = time.time()
    codes = draw_codes(backbone, prompts, cfg, progress=progress, stats=stats)
    images = tensor_to_pil(decode_each(backbone, codes))
    return Drawing(codes=codes, images=images, stats=stats, seconds=time.time() - t0)


def decode_each(backbone, codes: torch.Tensor) -> torch.Tensor:
    """Pixels one image at a time: the VQ decoder's full-resolution fp32 activations for a batch of 768-px
    images would outgrow the sampler's own memory (about 1.2 GB per feature map for 4 images)."""
    return torch.cat([backbone.decode_images(c[None]) for c in codes])
