"""Speculative Jacobi decoding: the same images as plain sampling, in fewer forward passes."""

import json
import random

import pytest
from helpers import run_cli as run
from distributions import chi_square_p_value
import torch

from tokenbooth.errors import UserError
from tokenbooth.sampling import SamplingConfig, SamplingStats, image_token_distribution
from tokenbooth.sampling.sampler import sample_image_body
from tokenbooth.sampling.coupling import COUPLINGS
from tokenbooth.sampling.processors import sample
from tokenbooth.sampling.sjd import SJDStats, one_hot_residual, sample_image_body_sjd, take_branch


# --- a micro backbone whose whole image distribution can be written down ---------------------------------
#
# 4 codes, a 2 x 2 grid: the body is [i i row-end i i row-end image-end], so an image is one of 4^4 = 256
# code tuples and the exact law plain sampling follows is a product of 1 + 4 + 16 + 64 processed
# distributions. Random weights give near-uniform logits; scaling the embeddings and the LM head makes every
# next-token law peaked and dependent on the tokens before it, so a sampler that gets the conditionals
# wrong shows.

def build_micro_backbone(seed: int = 0):
    from transformers import ChameleonForConditionalGeneration

    from tokenbooth.backbones.chameleon import ChameleonBackbone, ChameleonSpec
    from tokenbooth.toyworld import caption, pretraining_scene
    from tokenbooth.vq import VQGAN, VQGANConfig
    from tokenbooth.backbones.chameleon_build import chameleon_config, train_bpe_tokenizer

    class MicroBackbone(ChameleonBackbone):
        def prompt_text(self, prompt: str) -> str:
            return prompt  # without Lumina-mGPT's 50-token template: 10^4 samples in a second or two

    torch.manual_seed(seed)
    vq_cfg = VQGANConfig(embed_dim=4, n_embed=4, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=0, resolution=4)
    rng = random.Random(seed)
    tokenizer = train_bpe_tokenizer([caption(pretraining_scene(i), rng) for i in range(50)], vq_cfg.n_embed, 40)
    config = chameleon_config(tokenizer.get_vocab(), n_codes=vq_cfg.n_embed, hidden=32, layers=1, heads=2, context=128)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(20.0)
        model.lm_head.weight.mul_(15.0)
    return MicroBackbone("micro", model, tokenizer, VQGAN(vq_cfg).eval(), ChameleonSpec(resolution=4, size_unit=2))


@pytest.fixture(scope="module")
def micro():
    return build_micro_backbone()


@torch.no_grad()
def exact_image_law(backbone, prompt: str, cfg: SamplingConfig) -> torch.Tensor:
    """P(codes) for every code tuple of the image, row-major, as plain AR sampling defines it: (K^cells,)."""
    layout = backbone.layout
    K = layout.codebook_size
    image_positions = [j for j in range(layout.body_length) if layout.forced_token(j) is None]
    cond, uncond = backbone.prompt_ids(prompt), backbone.unconditional_ids()
    law, tuples = torch.ones(1, dtype=torch.float64), [[]]
    for j in image_positions:
        bodies = []
        for codes in tuples:
            it = iter(codes)
            bodies.append([layout.forced_token(i) if layout.forced_token(i) is not None
                           else int(layout.image_token_ids[next(it)]) for i in range(j)])
        cond_logits = backbone.image_logits(torch.tensor([cond + b for b in bodies]))[0][:, -1]
        uncond_logits = backbone.image_logits(torch.tensor([uncond + b for b in bodies]))[0][:, -1]
        p = image_token_distribution(cond_logits, uncond_logits, cfg).double()
        law = (law[:, None] * p).reshape(-1)
        tuples = [t + [c] for t in tuples for c in range(K)]
    return law


def sjd(**settings) -> dict:
    return dict(sampler="sjd", **settings)


def draw_codes(backbone, sampler, cfg: SamplingConfig, images: int, chunk: int = 4000, **kw) -> torch.Tensor:
    """`images` draws of one prompt, in batches of `chunk` with their own seeds: (images, cells) codes."""
    out = []
    for i in range(images // chunk):
        cfg_i = SamplingConfig.for_family("mini", **{**cfg.to_dict(), "seed": cfg.seed * 1000 + i})
        body = sampler(backbone, [PROMPT] * chunk, cfg_i, **kw)
        out.append(backbone.layout.codes_from_body(body).flatten(1))
    return torch.cat(out)


def fit_p_values(codes: torch.Tensor, law: torch.Tensor, K: int) -> dict[str, float]:
    """p-values of the joint law of all cells and of each cell's marginal."""
    cells = codes.shape[1]
    index = (codes * K ** torch.arange(cells - 1, -1, -1)).sum(1)
    joint = torch.bincount(index, minlength=K**cells)
    out = {"joint": chi_square_p_value(joint, law)}
    grid = law.reshape([K] * cells)
    for c in range(cells):
        marginal = grid.sum(dim=[d for d in range(cells) if d != c])
        out[f"cell {c}"] = chi_square_p_value(torch.bincount(codes[:, c], minlength=K), marginal)
    return out


def total_variation(codes: torch.Tensor, law: torch.Tensor, K: int) -> float:
    index = (codes * K ** torch.arange(codes.shape[1] - 1, -1, -1)).sum(1)
    empirical = torch.bincount(index, minlength=K ** codes.shape[1]).double() / len(codes)
    return float((empirical - law).abs().sum() / 2)


PROMPT = "a red robot"
IMAGES = 12_000
# Each sampler below is checked 5 times (the joint law of the 4 cells and each cell's marginal), 105 checks in
# all; each must have p > ALPHA, so a correct sampler fails the file with probability below 105 * ALPHA = 0.5%.
ALPHA = 5e-5
GUIDED = dict(cfg_scale=3.0, image_top_k=3)  # top-k 3 of 4: zero-probability drafts get rejected
NUCLEUS = dict(cfg_scale=1.0, top_p=0.9, temperature=1.2)
SETTINGS = {  # every coupling under CFG, top-k, top-p, temperature, both inits, one window each
    "guided-random-L2": dict(**GUIDED, sjd_window=2, sjd_init="random"),
    "guided-above-L3": dict(**GUIDED, sjd_window=3, sjd_init="above"),
    "nucleus-random-L7": dict(**NUCLEUS, sjd_window=7, sjd_init="random"),
    "nucleus-above-L4": dict(**NUCLEUS, sjd_window=4, sjd_init="above"),
}
CASES = [("plain", GUIDED)]  # the check itself: plain sampling must pass it
# the default proactive branch (one sibling) under every coupling and setting
CASES += [(f"sjd-{c}-{name}", sjd(**s, sjd_coupling=c)) for c in COUPLINGS for name, s in SETTINGS.items()]
# MC-SJD without the branch, and a branch of 3 (the repeated token verified along it, across the row end)
CASES += [(f"sjd-maximal-{name}-proactive{d}", sjd(**s, sjd_coupling="maximal", sjd_proactive=d))
          for d in (0, 3) for name, s in SETTINGS.items()]
CASES += [("sjd-unbatched-nocache-L5-proactive3", sjd(cfg_scale=2.0, batched_cfg=False, kv_cache=False, sjd_window=5,
                                                      sjd_init="above", sjd_proactive=3))]


@pytest.mark.parametrize("settings", [s for _, s in CASES], ids=[name for name, _ in CASES])
def test_sjd_samples_follow_the_plain_sampling_law(micro, settings):
    cfg = SamplingConfig.for_family("mini", **settings, seed=1)
    law = exact_image_law(micro, PROMPT, cfg)
    fn = sample_image_body_sjd if cfg.sampler == "sjd" else sample_image_body
    codes = draw_codes(micro, fn, cfg, IMAGES)
    p_values = fit_p_values(codes, law, K=4)
    tv = total_variation(codes, law, K=4)
    assert min(p_values.values()) > ALPHA, f"{p_values}, total variation {tv:.3f}"


def always_accept(p_x, q_x, u):
    return torch.ones_like(u, dtype=torch.bool)


def accept_if_more_likely(p_x, q_x, u):
    return p_x >= q_x  # a plausible-looking deterministic rule; not speculative sampling


def accept_with_p_whatever_q(p_x, q_x, u):
    return u < p_x  # right for a one-hot q only: wrong for uniform random drafts and for redrawn ones


@pytest.mark.parametrize("rule", [always_accept, accept_if_more_likely, accept_with_p_whatever_q])
def test_the_check_fails_a_broken_acceptance_rule(micro, rule):
    cfg = SamplingConfig.for_family("mini", **sjd(**GUIDED, sjd_window=3, sjd_init="random", sjd_coupling="none"), seed=2)
    law = exact_image_law(micro, PROMPT, cfg)
    codes = draw_codes(micro, sample_image_body_sjd, cfg, IMAGES, _accept=rule)
    assert fit_p_values(codes, law, K=4)["joint"] < 1e-9


def redraw_from_q_new_after_a_miss(coupling, old, q_old, q_new, noise, generator):
    """Maximal coupling's keep test, but a missed draft comes from q_new instead of the residual: the new
    draft is no longer distributed as q_new, which the acceptance test then assumes."""
    keep = torch.rand(len(old), generator=generator) * q_old.gather(1, old[:, None])[:, 0] < \
        q_new.gather(1, old[:, None])[:, 0]
    return torch.where(keep, old, sample(q_new, generator))


def keep_the_old_draft_while_possible(coupling, old, q_old, q_new, noise, generator):
    return torch.where(q_new.gather(1, old[:, None])[:, 0] > 0, old, sample(q_new, generator))


@pytest.mark.parametrize("coupling", [redraw_from_q_new_after_a_miss, keep_the_old_draft_while_possible])
def test_the_check_fails_a_broken_coupling(micro, coupling):
    cfg = SamplingConfig.for_family("mini", **sjd(**GUIDED, sjd_window=7, sjd_init="random"), seed=3)  # the whole body re-drafted
    law = exact_image_law(micro, PROMPT, cfg)
    codes = draw_codes(micro, sample_image_body_sjd, cfg, IMAGES, _redraft=coupling)
    assert fit_p_values(codes, law, K=4)["joint"] < 1e-9


def sibling_tested_against_p(sampler, w, accepted, p_first, p_branch, run, eligible):
    """After the first draft's rejection, tests the sibling like a second one-hot draft, with p(sibling), and
    takes it on success: right only against the residual law, which the rejection left, not against p."""
    first = (w.last + 1).clamp(max=sampler.bl - 1)
    u = torch.rand(len(run), generator=sampler.generator)
    swap = eligible & (accepted == 0) & (u < p_first.gather(1, run[:, None])[:, 0])
    w.codes[swap.nonzero()[:, 0], first[swap]] = run[swap]
    return take_branch(sampler, w, accepted, p_first, p_branch, run, eligible)


def test_the_check_fails_a_broken_proactive_branch(micro):
    cfg = SamplingConfig.for_family("mini", **sjd(**GUIDED, sjd_window=2, sjd_init="random", sjd_coupling="none",
                                                 sjd_proactive=3), seed=4)
    law = exact_image_law(micro, PROMPT, cfg)
    codes = draw_codes(micro, sample_image_body_sjd, cfg, IMAGES, _branch=sibling_tested_against_p)
    assert fit_p_values(codes, law, K=4)["joint"] < 1e-9


def draw_from_the_whole_law_after_a_rejection(law, token, rejected):
    """Along the branch, a rejected repeat is replaced by a draw from the whole law, not the law without it."""
    return law


@pytest.mark.parametrize("residual,right", [(one_hot_residual, True),
                                            (draw_from_the_whole_law_after_a_rejection, False)])
def test_a_repeat_along_the_branch_and_its_residual_give_the_law(residual, right):
    """The branch's further tokens are one-hot drafts: accepted with law(token), else replaced by a draw from
    `one_hot_residual`. Together that is a draw from the law, whatever the token. (On the micro model the
    branch rarely goes that far, so this step is checked on its own, with a law that has a zero.)"""
    g = torch.Generator().manual_seed(7)
    draws = 40_000
    law = torch.tensor([0.45, 0.3, 0.0, 0.25]).expand(draws, 4)
    token = torch.full((draws,), 0)
    keep = torch.rand(draws, generator=g) < law[:, 0]
    drawn = torch.where(keep, token, sample(residual(law, token, ~keep), g))
    p_value = chi_square_p_value(torch.bincount(drawn, minlength=4), law[0])
    assert (p_value > 1e-4) if right else (p_value < 1e-9)


# --- behaviour on the tiny model of the other tests -------------------------------------------------------

@pytest.mark.parametrize("init", ["random", "above"])
def test_same_seed_same_image_and_other_seed_other_image(tiny_backbone, init):
    def draw(seed):
        return sample_image_body_sjd(tiny_backbone, ["a red robot"] * 2,
                                     SamplingConfig.for_family("mini", **sjd(sjd_window=8, sjd_init=init), seed=seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("init", ["random", "above"])
def test_structure_tokens_sit_at_their_places(tiny_backbone, init):
    layout = tiny_backbone.layout
    body = sample_image_body_sjd(tiny_backbone, ["a red robot", "a cup"],
                                 SamplingConfig.for_family("mini", **sjd(sjd_window=16, sjd_init=init), seed=1))
    image_ids = set(layout.image_token_ids.tolist())
    for j in range(layout.body_length):
        forced = layout.forced_token(j)
        column = body[:, j].tolist()
        assert all(t == forced for t in column) if forced is not None else all(t in image_ids for t in column)


@pytest.mark.parametrize("window", [1, 5, 16, 73])
@pytest.mark.parametrize("init", ["random", "above"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_greedy_sjd_is_greedy_plain_sampling_even_with_padded_rows(tiny_backbone, window, init, coupling):
    cfg = SamplingConfig.for_family("mini", **sjd(sjd_window=window, sjd_init=init, sjd_coupling=coupling), seed=0,
                         image_top_k=1)  # p is one-hot: any wrong conditional or stale cache shows
    prompts = ["a red robot on the beach, on the left", "a cup"]
    assert tiny_backbone.layout.body_length == 73
    assert torch.equal(sample_image_body_sjd(tiny_backbone, prompts, cfg),
                       sample_image_body(tiny_backbone, prompts, cfg))


@pytest.mark.parametrize("window", [1, 5, 16])
@pytest.mark.parametrize("proactive", [1, 4])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_greedy_sjd_with_a_proactive_branch_is_greedy_plain_sampling(tiny_backbone, window, proactive, kv_cache):
    """The branch's keys and values move into the cache when it is taken: a wrong column or position there
    changes a greedy image. The test also makes sure the branch was taken at all."""
    taken = []

    def counting(*args):
        out = take_branch(*args)
        taken.append(int((out > 0).sum()))
        return out

    cfg = SamplingConfig.for_family("mini", **sjd(sjd_window=window, sjd_proactive=proactive), seed=0, image_top_k=1,
                                    kv_cache=kv_cache)
    prompts = ["a red robot on the beach, on the left", "a cup"]
    assert torch.equal(sample_image_body_sjd(tiny_backbone, prompts, cfg, _branch=counting),
                       sample_image_body(tiny_backbone, prompts, cfg))
    assert sum(taken) > 0


def test_greedy_sjd_is_greedy_plain_sampling_on_janus_too(janus_fp32_dir):
    """Janus-Pro is a Llama under the hood, with its own CFG rows: the ragged cache must serve it as well."""
    from tokenbooth.backbones import load_backbone

    janus = load_backbone(str(janus_fp32_dir))
    prompts = ["a red robot on the beach, on the left", "a cup"]
    for coupling in COUPLINGS:
        cfg = SamplingConfig.for_family("mini", **sjd(sjd_window=5, sjd_coupling=coupling), seed=0, image_top_k=1)
        assert torch.equal(sample_image_body_sjd(janus, prompts, cfg), sample_image_body(janus, prompts, cfg))


def test_draw_gives_the_same_greedy_codes_with_either_sampler(tiny_backbone):
    from tokenbooth.sampling import draw_codes

    prompts = ["a red robot on the beach, on the left", "a cup"]
    plain = draw_codes(tiny_backbone, prompts, SamplingConfig.for_family("mini", seed=0, image_top_k=1))
    stats = SJDStats()
    sjd = draw_codes(tiny_backbone, prompts, SamplingConfig.for_family("mini", seed=0, image_top_k=1, sampler="sjd", sjd_window=8),
                     stats=stats)
    assert torch.equal(plain, sjd) and stats.forward_passes < tiny_backbone.layout.rows * tiny_backbone.layout.cols


@pytest.mark.parametrize("kv_cache,batched_cfg", [(False, True), (True, False)])
def test_speedups_do_not_change_the_sjd_image(tiny_backbone, kv_cache, batched_cfg):
    prompts = ["a red robot on the beach, on the left", "a cup"]
    fast = sample_image_body_sjd(tiny_backbone, prompts, SamplingConfig.for_family("mini", **sjd(sjd_window=6), seed=5))
    slow = sample_image_body_sjd(tiny_backbone, prompts, SamplingConfig.for_family("mini", **sjd(sjd_window=6), seed=5, kv_cache=kv_cache,
                                                                        batched_cfg=batched_cfg))
    assert torch.equal(fast, slow)


def test_every_pass_fixes_at_least_one_token_per_image(tiny_backbone):
    layout = tiny_backbone.layout
    stats = SJDStats()
    sample_image_body_sjd(tiny_backbone, ["a red robot", "a cup"], SamplingConfig.for_family("mini", **sjd(sjd_window=16), seed=2),
                          stats=stats)
    image_tokens = layout.rows * layout.cols
    assert sum(k * v for k, v in stats.tokens_per_pass.items()) == 2 * image_tokens
    assert min(stats.tokens_per_pass) >= 1 and max(stats.tokens_per_pass) <= 16 + 1
    assert stats.forward_passes == max(stats.passes_per_image) <= image_tokens  # one batched pass per step
    assert stats.tokens == 2 * layout.body_length


class FedWidths:
    """Wraps a backbone and records how many columns each forward pass feeds."""

    def __init__(self, backbone):
        self.backbone, self.widths = backbone, []

    def hidden_states(self, input_ids=None, **kw):
        self.widths.append(input_ids.shape[1])
        return self.backbone.hidden_states(input_ids, **kw)

    def __getattr__(self, name):
        return getattr(self.backbone, name)


def test_each_image_of_a_batch_advances_on_its_own(tiny_backbone):
    """After the first pass (the prompts too), a pass feeds every image's own last token, window and
    proactive branch: L + 1 + D columns, however far apart the images are, fewer only once every image left is
    near its end; an image that is done leaves the batch."""
    spy, stats = FedWidths(tiny_backbone), SJDStats()
    prompts = ["a red robot on the beach, on the left", "a cup", "a blue ball", "a green tree on a hill"]
    cfg = SamplingConfig.for_family("mini", **sjd(sjd_window=8), seed=3)
    sample_image_body_sjd(spy, prompts, cfg, stats=stats)
    full = 8 + 1 + cfg.sjd_proactive  # the proactive branch beside the window
    widths = spy.widths[1:]
    assert widths[0] == full and widths == sorted(widths, reverse=True)
    assert widths[-1] < full  # near the end, no columns for positions past the body
    assert len(set(stats.passes_per_image)) > 1  # the images did not finish together...
    assert stats.forward_passes == max(stats.passes_per_image)  # ...and none waited for another


@pytest.mark.parametrize("settings,message", [
    (dict(sjd_window=0), "--sjd-window"),
    (dict(sjd_window=74), "--sjd-window"),
    (dict(sjd_init="left"), "--sjd-init"),
    (dict(sjd_coupling="optimal"), "--sjd-coupling"),
    (dict(sjd_proactive=-1), "--sjd-proactive"),
    (dict(sjd_proactive=74), "--sjd-proactive"),
])
def test_bad_sjd_settings_are_refused(tiny_backbone, settings, message):
    with pytest.raises(UserError, match=message) as e:
        sample_image_body_sjd(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", **sjd(**settings)))
    assert "\n" not in str(e.value)


def test_bad_sampling_settings_are_refused_by_sjd_too(tiny_backbone):
    with pytest.raises(UserError, match="--top-p"):
        sample_image_body_sjd(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", **sjd(), top_p=0.0), stats=SamplingStats())


# --- the command line -----------------------------------------------------------------------------------

def test_generate_with_the_sjd_sampler(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a red robot", "--model", str(tiny_model_dir), "-n", "2", "--out", str(out),
                     "--sampler", "sjd", "--sjd-window", "8", "--sjd-init", "random", "--sjd-coupling", "gumbel",
                     "--sjd-proactive", "2")
    assert code == 0 and (out / "image-001.png").exists() and (out / "grid.png").exists()
    meta = json.loads((out / "generate.json").read_text())
    assert meta["sampler"] == "sjd" and meta["sjd_window"] == 8 and meta["sjd_init"] == "random"
    assert meta["sjd_coupling"] == "gumbel" and meta["sjd_proactive"] == 2
    assert 0 < meta["forward_passes"] < 64  # plain sampling takes 64 passes for an 8 x 8 image


def test_the_plain_sampler_stays_the_default(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, "generate", "a cup", "--model", str(tiny_model_dir), "-n", "1", "--out", str(out))[0] == 0
    meta = json.loads((out / "generate.json").read_text())
    assert meta["sampler"] == "plain" and meta["forward_passes"] == 64


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "sjd", "--sjd-window", "0"], "--sjd-window"),
    (["--sampler", "sjd", "--sjd-window", "1000"], "--sjd-window"),
    (["--sjd-window", "8"], "--sampler sjd"),
    (["--sjd-init", "above"], "--sampler sjd"),
    (["--sampler", "sjd", "--sjd-coupling", "optimal"], "--sjd-coupling"),
    (["--sjd-coupling", "gumbel"], "--sampler sjd"),
    (["--sampler", "sjd", "--sjd-proactive", "-2"], "--sjd-proactive"),
    (["--sjd-proactive", "2"], "--sampler sjd"),
])
def test_bad_sjd_flags_get_one_line_and_a_non_zero_exit(tiny_model_dir, tmp_path, capsys, extra, message):
    out = str(tmp_path / "o")
    code, _, err = run(capsys, "generate", "a cup", "--model", str(tiny_model_dir), "--out", out, *extra)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "grid.png").exists()
