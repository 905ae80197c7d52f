"""mini v3's tokenizer pilot (pretrain/mini_v3_pilot.py): the subject mask, the weighted loss, bitwise resume.
Tiny VQGAN, a few steps: the pilot itself is never trained here."""

import shutil

import numpy as np
import pytest
import torch

from dataclasses import replace

from tokenbooth.pretrain.mini_v3_pilot import Design, Trainer, build_data, reconstruction_loss, subject_mask, token_share
from tokenbooth.pretrain.patch_discriminator import (
    PatchDiscriminator, adaptive_weight, feature_matching_loss, hinge_discriminator_loss,
)
from tokenbooth.toyworld import pretraining_scene, render, render_background
from tokenbooth.toyworld.render import CANVAS
from tokenbooth.vq import VQGANConfig

TINY = Design("tiny", VQGANConfig(embed_dim=8, n_embed=32, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                  resolution=64), subject_weight=4.0, batch=2)


def test_subject_mask_covers_every_pixel_the_subject_paints_and_nothing_far_from_it():
    for i in range(20):
        scene = pretraining_scene(i)
        mask = subject_mask(scene, CANVAS)
        painted = (np.asarray(render(scene, CANVAS)) != np.asarray(render_background(scene.background, scene.seed,
                                                                                     CANVAS))).any(-1)
        assert mask.sum() > 0
        assert not (painted & (mask < 1)).any()  # every changed pixel is the subject's
        assert mask[:5].sum() == 0  # the top rows are sky or backdrop: subjects stand on the ground
    at_64 = subject_mask(pretraining_scene(0))  # box-filtered to 64 px as render() is: coverage in [0, 1]
    assert at_64.shape == (64, 64) and 0 < at_64.mean() < 0.6 and at_64.max() <= 1.0


def test_token_share_counts_cells_a_quarter_covered():
    mask = np.zeros((8, 8), np.float32)
    mask[:4, :4] = 1.0  # one 4x4 cell of four
    assert token_share(mask, 4) == 0.25
    mask[:1, 4:8] = 1.0  # a quarter of the next cell
    assert token_share(mask, 4) == 0.5


def test_unweighted_loss_is_v2s_l1_plus_l2_and_weighting_favours_the_subject():
    recon, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4) * 0.5
    mask = torch.zeros(2, 1, 4, 4)
    assert torch.isclose(reconstruction_loss(recon, target, mask, 0.0),
                         torch.nn.functional.l1_loss(recon, target) + torch.nn.functional.mse_loss(recon, target))
    target[:, :, :2] = 1.0  # bigger error on the subject's rows
    mask[:, :, :2] = 1.0
    assert reconstruction_loss(recon, target, mask, 4.0) > reconstruction_loss(recon, target, mask, 0.0)


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the discriminator joins the generator's loss at step 1 of 4, so a resume crosses both kinds of step
TINY_ADVERSARIAL = replace(TINY, name="tiny-adv", adversarial_weight=0.5, adversarial_start=1)


@pytest.mark.parametrize("design", [TINY, TINY_ADVERSARIAL], ids=["plain", "adversarial"])
def test_pilot_training_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path, design):
    first = tmp_path / "straight"
    first.mkdir()
    build_data(first, num_train=12, num_held_out=2)
    other = tmp_path / "resumed"
    shutil.copytree(first, other)

    straight = Trainer(design, first, total_steps=4)
    for _ in range(4):
        assert np.isfinite(straight.step()["rec"])

    interrupted = Trainer(design, other, total_steps=4)
    for _ in range(2):
        interrupted.step()
    interrupted.save_checkpoint()
    torch.manual_seed(123)  # whatever happened in between must not matter
    resumed = Trainer(design, other, total_steps=4)
    assert resumed.step_no == 2
    for _ in range(2):
        last = resumed.step()
    assert _states_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert torch.equal(straight.usage, resumed.usage)
    if design is TINY_ADVERSARIAL:
        assert _states_equal(straight.disc.state_dict(), resumed.disc.state_dict())
        assert last["weight"] > 0 and np.isfinite(last["sharpen"])
    else:
        assert straight.disc is None and "disc" not in last  # v2's loss alone: D is trained as it was


def test_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer():
    layer = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec = (layer ** 2).sum()  # gradient 2 * layer = (2, 4)
    adversarial = 3 * layer.sum()  # gradient (3, 3)
    expected = torch.tensor([2.0, 4.0]).norm() / (torch.tensor([3.0, 3.0]).norm() + 1e-4)
    assert torch.isclose(adaptive_weight(rec, adversarial, layer), expected)


def test_feature_matching_is_zero_on_the_same_picture_and_grows_with_the_difference():
    torch.manual_seed(0)
    disc = PatchDiscriminator()
    real = torch.rand(2, 3, 64, 64) * 2 - 1
    logits, features = disc(real)
    assert logits.shape == (2, 1, 8, 8) and len(features) == 3
    near = disc(real + 0.05 * torch.randn_like(real))[1]
    far = disc(real + 0.5 * torch.randn_like(real))[1]
    assert feature_matching_loss(features, features) == 0
    assert 0 < feature_matching_loss(features, near) < feature_matching_loss(features, far)


def test_the_discriminator_learns_to_tell_renders_from_blurred_ones():
    torch.manual_seed(0)
    real = torch.from_numpy(np.stack([np.asarray(render(pretraining_scene(i), 64)) for i in range(8)]))
    real = real.permute(0, 3, 1, 2).float() / 127.5 - 1
    blurred = torch.nn.functional.avg_pool2d(real, 4)
    blurred = torch.nn.functional.interpolate(blurred, scale_factor=4.0, mode="bilinear")
    disc = PatchDiscriminator()
    opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.9))
    losses = []
    for _ in range(40):
        loss = hinge_discriminator_loss(disc(real)[0], disc(blurred)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 0.5 * losses[0]  # chance is 2: it learns what blur looks like


def test_deepen_keeps_the_shallow_weights_and_starts_its_new_level_as_pooling_and_identity():
    from tokenbooth.pretrain.mini_v3_pilot import deepen
    from tokenbooth.vq import VQGAN

    torch.manual_seed(0)
    shallow = VQGAN(TINY.vqgan)
    deep_cfg = VQGANConfig(embed_dim=8, n_embed=16, z_channels=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                           resolution=64)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    deep = deepen(shallow, deep_cfg, pixels)
    old, new = shallow.state_dict(), deep.state_dict()
    shared = [k for k in new if k in old and old[k].shape == new[k].shape]
    assert len(shared) > 0.7 * len(old)
    assert all(torch.equal(old[k], new[k]) for k in shared)

    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        for block in [*deep.encoder.down[2].block, *deep.decoder.up[2].block]:
            assert torch.allclose(block(x), x)
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        assert torch.allclose(deep.encoder.down[1].downsample(x), pooled, atol=1e-6)
        assert torch.allclose(deep.decoder.up[2].upsample(pooled), torch.nn.functional.interpolate(pooled, scale_factor=2.0),
                              atol=1e-6)
        latents = deep.encode_latent(pixels).permute(0, 2, 3, 1).reshape(-1, 8)
    # every code starts within noise of one of the new latents
    gaps = torch.cdist(deep.quantize.embedding.weight, latents).min(dim=1).values
    assert gaps.max() < 0.1
    assert deep.encode(pixels).shape == (2, 16, 16)


def test_deepen_refuses_anything_but_one_more_level():
    import pytest

    from tokenbooth.pretrain.mini_v3_pilot import deepen
    from tokenbooth.vq import VQGAN

    with pytest.raises(ValueError):
        deepen(VQGAN(TINY.vqgan), TINY.vqgan, torch.zeros(1, 3, 64, 64))


def test_identity_figures_split_the_pictures_by_the_subjects_size():
    from tokenbooth.eval.reader import scene_attributes
    from tokenbooth.pretrain.mini_v3_score import identity_figures

    scenes = [pretraining_scene(i) for i in range(12)]
    sizes = [s.size for s in scenes]
    assert {"small", "large"} <= set(sizes)

    class ReadsLargeOnesRight:  # a stand-in reader: every large subject read right, every small one with a wrong class
        def read(self, images):
            readings = [scene_attributes(s) for s in scenes]
            return [r if s.size == "large" else {**r, "cls": "nothing"} for r, s in zip(readings, scenes)]

    figures = identity_figures(ReadsLargeOnesRight(), [None] * len(scenes), scenes)
    assert figures["identity_all_by_size"] == {"large": 1.0, "small": 0.0}
    assert figures["identity_all"] == sizes.count("large") / len(scenes)
