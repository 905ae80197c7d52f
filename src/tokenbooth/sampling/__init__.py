"""Sampling images from a backbone: KV cache, batched classifier-free guidance, structure rules, SJD.
`draw` is the one entry point every caller uses."""

from .draw import SAMPLERS, Drawing, check_sampler, draw, draw_codes, draw_in_batches
from .processors import SamplingConfig, image_token_distribution
from .sampler import SamplingStats, sample_image_tokens
