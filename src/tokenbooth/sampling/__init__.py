"""Sampling images from a backbone: KV cache, batched classifier-free guidance, structure rules."""

from .processors import SamplingConfig, image_token_distribution
from .sampler import SamplingStats, generate_images, sample_image_tokens
