"""mini v3's transformer question (pretrain/mini_focus.py): the subject-weighted loss, and resuming, on a tiny
Chameleon saved as mini is."""

import numpy as np
import torch
import torch.nn.functional as F

from helpers import build_tiny_model_folder
from tokenbooth.backbones import load_backbone
from tokenbooth.pretrain import mini_focus as mf


def _tiny_work(tmp_path, n=6):
    """train.npz as mini_decoder writes it, for the tiny model: 16 px pictures, 8 x 8 codes of 64."""
    base = build_tiny_model_folder(tmp_path / "base")
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(64, (n, 8, 8), generator=gen)
    masks = np.zeros((n, 16, 16), np.uint8)
    masks[:, 4:10, 6:12] = 255  # a subject covering 3 x 3 tokens
    np.savez(tmp_path / "train.npz", pixels=np.zeros((n, 16, 16, 3), np.uint8), masks=masks,
             codes=codes.numpy().astype(np.int16))
    return base


def test_weights_follow_the_subject_s_tokens_and_leave_structure_tokens_at_one(tmp_path):
    backbone = load_backbone(str(_tiny_work(tmp_path)), device="cpu")
    codes, cover = mf.load_train(tmp_path)
    layout = backbone.layout
    w = mf.token_weights(layout, cover[:1], subject_weight=4.0)[0]
    assert len(w) == layout.body_length + len(layout.trailer)
    body = layout.body_from_codes(codes[:1])[0]
    image = layout.image_positions()
    grid = w[: layout.body_length][image].reshape(layout.rows, layout.cols)
    assert torch.all(grid[2:5, 3:6] == 5.0) and grid.sum() == 5.0 * 9 + (64 - 9)
    assert torch.all(w[: layout.body_length][~image] == 1.0)  # row ends and the image end
    assert body[~image].tolist().count(layout.image_end) == 1


def test_unweighted_loss_is_the_plain_mean_and_weighting_moves_it_towards_the_subject(tmp_path):
    backbone = load_backbone(str(_tiny_work(tmp_path)), device="cpu")
    codes, cover = mf.load_train(tmp_path)
    ids, labels, w0 = mf.focus_batch(backbone, codes, cover, [0, 1, 2], step=0, subject_weight=0.0)
    _, _, w4 = mf.focus_batch(backbone, codes, cover, [0, 1, 2], step=0, subject_weight=4.0)
    with torch.no_grad():
        hidden, _ = backbone.hidden_states(ids)
        logits = backbone.vocabulary_logits(hidden).float()
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none")
        plain = mf.weighted_sequence_loss(backbone, ids, labels, w0)
        weighted = mf.weighted_sequence_loss(backbone, ids, labels, w4)
    known = labels[:, 1:].reshape(-1) != -100
    assert torch.allclose(plain, ce[known].mean())
    subject = (w4[:, 1:].reshape(-1) > 1) & known
    # the weighted mean lies between the plain mean and the subject tokens' mean
    lo, hi = sorted([ce[known].mean().item(), ce[subject].mean().item()])
    assert lo < weighted.item() < hi


def test_training_resumes_exactly_and_exports_a_loadable_model(tmp_path):
    base = _tiny_work(tmp_path)
    whole = mf.FocusRun("whole", steps=3, batch=2, lr=1e-3)
    split = mf.FocusRun("split", steps=3, batch=2, lr=1e-3)
    assert mf.train(tmp_path, whole, base=base)
    assert not mf.train(tmp_path, split, max_minutes=0, base=base)  # stops before its first step, checkpointed
    assert mf.train(tmp_path, split, base=base)
    a = mf.export(tmp_path, "whole", base=base)
    b = mf.export(tmp_path, "split", base=base)
    ma = load_backbone(str(a), device="cpu").model.state_dict()
    mb = load_backbone(str(b), device="cpu").model.state_dict()
    shipped = load_backbone(str(base), device="cpu").model.state_dict()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)  # interrupted and resumed == uninterrupted
    assert not torch.equal(ma["model.layers.0.self_attn.q_proj.weight"], shipped["model.layers.0.self_attn.q_proj.weight"])
