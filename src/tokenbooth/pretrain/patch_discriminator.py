"""A patch discriminator and the losses it gives a tokenizer in training: an adversarial one and a perceptual
one learned in the run (feature matching), balanced against the reconstruction as taming-transformers does.
Used by the v3 tokenizer pilot's design E (mini_v3_pilot.py); no instrument (reader, toyDINO, toyCLIP) is involved."""

from __future__ import annotations

import torch


class PatchDiscriminator(torch.nn.Module):
    """Real-or-reconstructed logits for each 8 x 8-pixel patch of a 64-px picture (pix2pix's PatchGAN, three
    stride-2 levels); `features` are what the perceptual loss compares."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        levels, c_in = [], 3
        for i, c in enumerate(channels):
            norm = torch.nn.Identity() if i == 0 else torch.nn.GroupNorm(8, c)
            levels.append(torch.nn.Sequential(torch.nn.Conv2d(c_in, c, 4, stride=2, padding=1), norm,
                                              torch.nn.LeakyReLU(0.2)))
            c_in = c
        self.levels = torch.nn.ModuleList(levels)
        self.head = torch.nn.Conv2d(c_in, 1, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        features, h = [], pixels
        for level in self.levels:
            h = level(h)
            features.append(h)
        return self.head(h), features


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean()


def feature_matching_loss(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance of the discriminator's features, each level divided by the real features' mean size so
    that every level counts alike (pix2pixHD's feature matching)."""
    return sum((f - r.detach()).abs().mean() / (r.detach().abs().mean() + 1e-6) for r, f in zip(real, fake)) / len(real)


def adaptive_weight(rec: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's balance: the ratio of the two losses' gradient norms at the decoder's last layer, so the
    adversarial term pushes as hard as the reconstruction whatever their scales (clamped, detached)."""
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()
