"""Image tokenizers: pixels <-> discrete codes that sit in the transformer's vocabulary."""

from .vqgan import VQGAN, VQGANConfig, load_vqgan, pil_to_tensor, save_vqgan, tensor_to_pil
