"""The one way to sample: prompts and a SamplingConfig in, images and statistics out.

The config names the sampler (plain, or speculative Jacobi decoding with its options); generate, the demo,
the benchmarks, DreamBench, toy-bench and the web app all come through here, so a faster sampler lands
everywhere at once.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from ..errors import UserError
from ..vq import tensor_to_pil
from .processors import SamplingConfig
from .sampler import SamplingStats, sample_image_tokens
from .sjd import SJDStats, check_sjd_options, sample_image_tokens_sjd

SAMPLERS = ("plain", "sjd")


@dataclass
class Drawing:
    codes: torch.Tensor  # (B, rows, cols) codebook indices
    images: list  # PIL images, one per prompt
    stats: SamplingStats  # forward passes, tokens (and for SJD the accepted tokens per pass)
    seconds: float


def check_sampler(cfg: SamplingConfig, body_length: int | None = None) -> None:
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {cfg.sampler!r})")
    if cfg.sampler == "sjd":
        check_sjd_options(cfg.sjd_window, cfg.sjd_init, cfg.sjd_coupling, body_length, cfg.sjd_proactive)


def draw_codes(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False,
               stats: SamplingStats | None = None) -> torch.Tensor:
    """One image per prompt as codebook indices (B, rows, cols), with the sampler the config names."""
    cfg.validate()
    check_sampler(cfg, backbone.layout.body_length)
    if cfg.sampler == "sjd":
        return sample_image_tokens_sjd(backbone, prompts, cfg, progress=progress, stats=stats)
    return sample_image_tokens(backbone, prompts, cfg, progress=progress, stats=stats)


def draw(backbone, prompts: list[str], cfg: SamplingConfig, progress: bool = False) -> Drawing:
    """One image per prompt, decoded to pictures."""
    stats = SJDStats() if cfg.sampler == "sjd" else SamplingStats()
    t0 = time.time()
    codes = draw_codes(backbone, prompts, cfg, progress=progress, stats=stats)
    images = tensor_to_pil(decode_each(backbone, codes))
    return Drawing(codes=codes, images=images, stats=stats, seconds=time.time() - t0)


def decode_each(backbone, codes: torch.Tensor) -> torch.Tensor:
    """Pixels one image at a time: the VQ decoder's full-resolution fp32 activations for a batch of 768-px
    images would outgrow the sampler's own memory (about 1.2 GB per feature map for 4 images)."""
    return torch.cat([backbone.decode_images(c[None]) for c in codes])


def batch_seed(seed: int, index: int) -> int:
    """The seed of a run's batch `index`: the run's own for the first (so a run that fits one batch draws what
    `draw` does), then one derived from (seed, index) by a hash, so the later batches of a run with seed 0 are
    not the first batches of the runs with seeds 1, 2, ..."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"tokenbooth batch {seed} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are 64-bit; keep it non-negative


def draw_in_batches(backbone, prompts: list[str], cfg: SamplingConfig, batch_size: int,
                    progress: bool = False) -> Iterator[Drawing]:
    """The prompts' images `batch_size` at a time, each batch yielded as soon as it is decoded, so memory is
    one batch's whatever the number of prompts and a caller can save each batch before the next is drawn.
    Batch i samples with `batch_seed(cfg.seed, i)`."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        batch_cfg = replace(cfg, seed=batch_seed(cfg.seed, index))
        yield draw(backbone, prompts[start:start + batch_size], batch_cfg, progress=progress)
