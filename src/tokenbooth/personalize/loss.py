"""What a training step sees: the references as VQ codes (once), batches of (prompt, image) pairs, and the
cross-entropy of the image codes, computed in chunks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from ..io import atomic_path
from .. import sampling
from ..vq import pil_to_tensor
from . import run_folder
from .config import TrainConfig, sampling_config
from .placeholder import Placeholder
from .templates import OBJECT_TEMPLATES, training_prompt

LOSS_CHUNK_TOKENS = 4096  # image-head rows per loss chunk: (4096, K) fp32 logits alive at a time, 134 MB for K = 8192


def reference_tokens(backbone, images, flip: bool) -> torch.Tensor:
    """VQ codes of every reference (and its mirror image when flipping): computed once, not every step."""
    pixels = pil_to_tensor(images)
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    return encode_each(backbone, pixels)


def encode_each(backbone, pixels: torch.Tensor) -> torch.Tensor:
    """VQ codes one image at a time: the encoder's full-resolution fp32 activations of a whole batch of 768-px
    references would take more memory than training (about 1.2 GB per feature map for 4 images)."""
    return torch.cat([backbone.encode_images(p[None]) for p in pixels])


def class_tokens(backbone, cfg: TrainConfig, out: Path) -> torch.Tensor:
    """Prior preservation (DreamBooth): the base model's own images of the class, drawn once and cached."""
    path = Path(out) / run_folder.CLASS_TOKENS
    if path.exists():
        codes = load_file(str(path))["codes"]
        if len(codes) >= cfg.num_class_images:
            return codes[: cfg.num_class_images]
    prompts = [training_prompt(i, cfg.class_name or "", None) for i in range(cfg.num_class_images)]
    codes = sampling.draw_codes(backbone, prompts, sampling_config(backbone, cfg))
    with atomic_path(path) as tmp:
        save_file({"codes": codes.contiguous()}, str(tmp))
    return codes


def make_batch(backbone, placeholder: Placeholder, cfg: TrainConfig, codes: torch.Tensor, generator, subject: bool):
    """`batch_size` (prompt, image) pairs: token ids (B, T), and labels (B, T) holding the image code at every
    image position and -100 (ignored) on the prompt, header and structure tokens."""
    n = cfg.batch_size if subject else max(1, cfg.batch_size // 2)
    picks = torch.randint(len(codes), (n,), generator=generator).tolist()
    templates = torch.randint(len(OBJECT_TEMPLATES), (n,), generator=generator).tolist()
    layout = backbone.layout
    seqs, labels = [], []
    for pick, template in zip(picks, templates):
        if subject:
            prompt = training_prompt(template, cfg.placeholder, cfg.class_name)
        else:
            prompt = training_prompt(template, cfg.class_name or "", None)
        prefix = placeholder.prompt_ids(backbone, prompt)
        image = codes[pick : pick + 1]
        seqs.append(prefix + layout.body_from_codes(image)[0].tolist())
        labels.append([-100] * len(prefix) + layout.body_labels(image)[0].tolist())
    width = max(map(len, seqs))
    ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])  # right padding is never attended to
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, lab


def batch_loss(backbone, placeholder: Placeholder, ids, labels, autocast, chunk_tokens: int = LOSS_CHUNK_TOKENS
               ) -> torch.Tensor:
    """Mean cross-entropy of the next image code, over the image codes only.

    The softmax runs over the K codes of `image_head`, not the whole vocabulary. That is Janus-Pro's own loss
    (its generation head has no text columns) and, for Lumina-mGPT, the log-likelihood of what its sampler
    actually draws (text tokens are masked at image positions); it differs from the full-vocabulary
    cross-entropy Lumina-mGPT trains with by the mass that softmax gives text tokens, which sampling never
    uses. It also skips 7/8 of Chameleon's output layer.

    The hidden states are computed once; the head and the cross-entropy run over chunks of about
    `chunk_tokens` positions, each under activation checkpointing, so the (batch, sequence, K) logits never
    exist whole, in the forward pass or the backward (Lumina-mGPT 768, batch 8: 0.27 GB a chunk instead of
    5 GB at once). Prompt positions go through the head too and are ignored by the loss (-100): about 2% more
    head work, and no shape that depends on the labels' values."""
    targets = labels[:, 1:]
    with autocast():
        hidden, _ = backbone.hidden_states(inputs_embeds=placeholder.embed(backbone, ids))
    hidden = hidden[:, :-1]
    targets = targets.to(hidden.device)
    width = max(1, chunk_tokens // hidden.shape[0])

    def chunk_loss(h, t):
        with autocast():
            logits = backbone.image_head(h)
        return F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), ignore_index=-100, reduction="sum")

    total = sum(checkpoint(chunk_loss, hidden[:, i:i + width], targets[:, i:i + width], use_reentrant=False)
                for i in range(0, hidden.shape[1], width))
    return total / (targets >= 0).sum()


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where bf16 matrix products are fast. Elsewhere (AVX2 only, e.g. many AMD
    EPYC and laptop CPUs) torch computes them in a slow generic path: 60x a float32 product, measured on an
    AVX2-only EPYC with torch 2.13 (4 ms against 237 ms for 512 x 512)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def runnable_compute_dtype(compute_dtype: str, device: str) -> str:
    """The compute dtype a run uses: the configured one, except bf16 on a CPU that has no native bf16, which
    computes in float32 instead (after a one-line note), so a family default chosen for speed (mini trains in
    bf16) never makes a run 60x slower. The trainable weights are fp32 either way; only the arithmetic changes."""
    if compute_dtype != "bfloat16" or device != "cpu" or cpu_has_native_bfloat16():
        return compute_dtype
    print("tokenbooth: this CPU has no native bfloat16 (AVX512-BF16 or AMX); training computes in float32",
          file=sys.stderr)
    return "float32"


def autocast_for(backbone, compute_dtype: str = "model"):
    """The autocast context of the forward passes: trainable fp32 copies, compute in the model's dtype (or
    bf16 where `compute_dtype` says so)."""
    dtype = next(backbone.model.parameters()).dtype if compute_dtype == "model" else getattr(torch, compute_dtype)
    device = next(backbone.model.parameters()).device.type
    if dtype == torch.float32:
        return lambda: torch.autocast(device, enabled=False)
    return lambda: torch.autocast(device, dtype=dtype)


def enable_gradient_checkpointing(backbone) -> None:
    """transformers' per-layer checkpointing (non-reentrant, so a frozen model with a trainable input
    embedding still gets gradients). It only acts on layers in training mode; the networks have no dropout
    in the layers personalization runs, so train mode changes nothing else."""
    # imported here for start-up time: the CLI's parser imports this package, and transformers takes seconds
    from transformers.modeling_layers import GradientCheckpointingLayer

    kwargs = {"use_reentrant": False}
    if hasattr(backbone.model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for module in backbone.model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.train()
