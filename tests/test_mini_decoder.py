"""mini v3's decoder step (pretrain/mini_decoder.py): the loss, what learns, and resuming."""

import numpy as np
import torch

from tokenbooth.pretrain import mini_decoder as md
from tokenbooth.pretrain.mini_v3_pilot import render_set
from tokenbooth.toyworld import pretraining_scene
from tokenbooth.vq import load_vqgan


def test_unweighted_loss_is_v2s_and_weights_favour_the_subject():
    torch.manual_seed(0)
    target, recon = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1.0
    v2 = (recon - target).abs().mean() + (recon - target).pow(2).mean()
    plain = md.decoder_loss(recon, target, mask, md.DecoderRun("x", subject_weight=0.0))
    assert torch.allclose(plain, v2)
    # an error only on the subject costs more when the subject is weighted, an error only off it less
    on_subject = target + 0.5 * mask
    off_subject = target + 0.5 * (1 - mask)
    run = md.DecoderRun("x", subject_weight=4.0)
    plain_run = md.DecoderRun("x", subject_weight=0.0)
    assert md.decoder_loss(on_subject, target, mask, run) > md.decoder_loss(on_subject, target, mask, plain_run)
    assert md.decoder_loss(off_subject, target, mask, run) < md.decoder_loss(off_subject, target, mask, plain_run)
    # the edge term sees a blur that the same pixel error elsewhere would not show as edges
    edged = md.DecoderRun("x", subject_weight=0.0, edge_weight=1.0)
    assert md.decoder_loss(recon, target, mask, edged) > plain


def _tiny_work(tmp_path, n=6):
    pixels, masks = render_set([pretraining_scene(i) for i in range(n)])
    codes = md.encode(load_vqgan(md.SHIPPED), md.to_tensor(pixels))
    np.savez(tmp_path / "train.npz", pixels=pixels, masks=masks, codes=codes.numpy().astype(np.int16))
    return pixels, codes


def test_training_changes_only_the_decoder_and_resumes_exactly(tmp_path):
    pixels, codes = _tiny_work(tmp_path)
    whole, split = md.DecoderRun("whole", steps=3, batch=2, lr=1e-3), md.DecoderRun("split", steps=3, batch=2, lr=1e-3)
    assert md.train(tmp_path, whole)
    assert not md.train(tmp_path, split, max_minutes=0)  # stops after its first step, checkpointed
    assert md.train(tmp_path, split)  # resumes there
    shipped = load_vqgan(md.SHIPPED).state_dict()
    a = load_vqgan(tmp_path / "whole" / "vqgan").state_dict()
    b = load_vqgan(tmp_path / "split" / "vqgan").state_dict()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name  # interrupted and resumed == uninterrupted
        learns = name.startswith(("decoder.", "post_quant_conv."))
        assert torch.equal(value, shipped[name]) != learns or not value.is_floating_point(), name
    # the frozen encoder and codebook give every picture the tokens it had: the transformer stays valid
    assert torch.equal(md.encode(load_vqgan(tmp_path / "whole" / "vqgan"), md.to_tensor(pixels)), codes)
