import pytest
import torch

from tokenbooth.errors import UserError
from tokenbooth.sampling import SamplingConfig, SamplingStats, image_token_distribution, sample_image_tokens
from tokenbooth.sampling.sampler import sample_image_body


def test_sampled_sequences_follow_the_structure_rules(tiny_backbone):
    layout = tiny_backbone.layout
    body = sample_image_body(tiny_backbone, ["a red robot", "a cup"], SamplingConfig.for_family("mini", seed=1))
    image_ids = set(layout.image_token_ids.tolist())
    for j in range(layout.body_length):
        forced = layout.forced_token(j)
        column = body[:, j].tolist()
        if forced is None:
            assert all(t in image_ids for t in column)
        else:
            assert all(t == forced for t in column)


def test_same_seed_same_image_and_other_seed_other_image(tiny_backbone):
    a = sample_image_tokens(tiny_backbone, ["a red robot"] * 2, SamplingConfig.for_family("mini", seed=3))
    b = sample_image_tokens(tiny_backbone, ["a red robot"] * 2, SamplingConfig.for_family("mini", seed=3))
    c = sample_image_tokens(tiny_backbone, ["a red robot"] * 2, SamplingConfig.for_family("mini", seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images of one batch differ too


@pytest.mark.parametrize("kv_cache,batched_cfg", [(False, True), (True, False), (False, False)])
def test_speedups_do_not_change_the_image(tiny_backbone, kv_cache, batched_cfg):
    prompts = ["a red robot on the beach, on the left", "a cup"]  # different lengths: left padding
    fast = sample_image_tokens(tiny_backbone, prompts, SamplingConfig.for_family("mini", seed=5))
    slow = sample_image_tokens(tiny_backbone, prompts, SamplingConfig.for_family("mini", seed=5, kv_cache=kv_cache, batched_cfg=batched_cfg))
    assert torch.equal(fast, slow)


def test_a_padded_row_sees_what_it_would_see_alone(tiny_backbone):
    cfg = SamplingConfig.for_family("mini", seed=0, image_top_k=1)  # greedy: any logit difference would show
    together = sample_image_tokens(tiny_backbone, ["a red robot on the beach, on the left", "a cup"], cfg)
    alone = sample_image_tokens(tiny_backbone, ["a cup"], cfg)
    assert torch.equal(together[1], alone[0])


def test_structure_tokens_cost_no_forward_pass(tiny_backbone):
    stats = SamplingStats()
    sample_image_tokens(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini"), stats=stats)
    layout = tiny_backbone.layout
    assert stats.forward_passes == layout.rows * layout.cols  # one batched pass per image token


def test_guidance_then_top_k_then_temperature():
    cond, uncond = torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    p = image_token_distribution(cond, uncond, SamplingConfig.for_family("mini", cfg_scale=2.0, image_top_k=4))
    expected = torch.softmax(uncond + 2.0 * (cond - uncond), -1)
    assert torch.allclose(p, expected)
    p = image_token_distribution(cond, uncond, SamplingConfig.for_family("mini", cfg_scale=2.0, image_top_k=2))
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = image_token_distribution(cond, None, SamplingConfig.for_family("mini", cfg_scale=1.0, image_top_k=4, top_p=0.5))
    assert p[0, 0] == 1.0  # the top token alone already holds half the mass


def test_top_k_one_is_greedy_whatever_the_seed(tiny_backbone):
    a = sample_image_tokens(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", seed=1, image_top_k=1))
    b = sample_image_tokens(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", seed=2, image_top_k=1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("field,value", [("cfg_scale", -1.0), ("image_top_k", 0), ("top_p", 0.0), ("temperature", 0.0)])
def test_bad_sampling_settings_are_refused(tiny_backbone, field, value):
    with pytest.raises(UserError):
        sample_image_tokens(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", **{field: value}))


def test_a_prompt_longer_than_the_context_is_refused(tiny_backbone):
    with pytest.raises(UserError, match="prompt too long"):
        sample_image_tokens(tiny_backbone, ["a red robot " * 100], SamplingConfig.for_family("mini"))


def test_a_prompt_too_long_is_told_by_how_many_tokens(tiny_backbone):
    from tokenbooth.sampling.sampler import check_prompt_fits

    room = tiny_backbone.max_length - tiny_backbone.layout.body_length
    fits = tiny_backbone.prompt_ids("a")
    check_prompt_fits(tiny_backbone, fits + [fits[-1]] * (room - len(fits)))  # exactly full: no error
    for over in (1, 3):
        with pytest.raises(UserError, match=f"by at least {over} token{'s' if over > 1 else ''}\\)"):
            check_prompt_fits(tiny_backbone, fits + [fits[-1]] * (room - len(fits) + over))
