"""The backbone protocol speaks in image codes: image logits in codebook order, training labels that are
codebook indices, trainable parameters that never include the image tokenizer or a vision encoder."""

import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tokenbooth.backbones import chameleon_build, load_backbone
from tokenbooth.errors import UserError
from tokenbooth.personalize.recipe import Placeholder, TrainConfig, batch_loss, make_batch, select_layer_params
from tokenbooth.sampling import SamplingConfig, draw


def shuffled_chameleon_backbone(monkeypatch, seed: int = 0):
    """A tiny Chameleon whose image tokens sit in the vocabulary in a shuffled order, so that codebook
    order and vocabulary order differ (in the tests' usual tiny model they happen to agree)."""
    from transformers import ChameleonForConditionalGeneration

    from tokenbooth.backbones.chameleon import ChameleonBackbone, ChameleonSpec, image_token_name
    from tokenbooth.toyworld import caption, pretraining_scene
    from tokenbooth.vq import VQGAN, VQGANConfig

    plain = chameleon_build.vocabulary_specials

    def shuffled(n_codes):
        names = plain(n_codes)
        images = [image_token_name(c) for c in range(n_codes)]
        start = names.index(images[0])
        random.Random(seed).shuffle(images)
        return names[:start] + images + names[start + n_codes:]

    monkeypatch.setattr(chameleon_build, "vocabulary_specials", shuffled)
    torch.manual_seed(seed)
    vq_cfg = VQGANConfig(embed_dim=16, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    texts = [caption(pretraining_scene(i), random.Random(i)) for i in range(100)]
    tokenizer = chameleon_build.train_bpe_tokenizer(texts, vq_cfg.n_embed, 40)
    config = chameleon_build.chameleon_config(tokenizer.get_vocab(), n_codes=vq_cfg.n_embed, hidden=64, layers=2,
                                              heads=4, context=160)
    return ChameleonBackbone("shuffled", ChameleonForConditionalGeneration(config).eval(), tokenizer,
                             VQGAN(vq_cfg).eval(), ChameleonSpec(resolution=16, size_unit=4, family="mini"))


@pytest.fixture
def shuffled(monkeypatch):
    return shuffled_chameleon_backbone(monkeypatch)


@pytest.fixture(scope="module")
def janus(janus_fp32_dir):
    return load_backbone(str(janus_fp32_dir))


def a_sequence_with_an_image(backbone, seed: int = 0) -> torch.Tensor:
    """A prompt, then a whole image block of random codes: (1, T) token ids."""
    layout = backbone.layout
    codes = torch.randint(layout.codebook_size, (1, layout.rows, layout.cols), generator=torch.Generator().manual_seed(seed))
    return torch.tensor([backbone.prompt_ids("a red robot") + layout.body_from_codes(codes)[0].tolist()])


# --- image logits -----------------------------------------------------------------------------------------

@torch.no_grad()
def test_chameleon_image_logits_are_the_lm_heads_image_columns_in_codebook_order(shuffled):
    ids = shuffled.layout.image_token_ids
    assert not bool((ids.diff() > 0).all())  # codebook order is not vocabulary order here
    seq = a_sequence_with_an_image(shuffled)
    ours, _ = shuffled.image_logits(seq)
    full = shuffled.model.lm_head(shuffled.model.model(input_ids=seq).last_hidden_state)
    assert ours.dtype == torch.float32 and ours.shape == (*seq.shape, shuffled.layout.codebook_size)
    torch.testing.assert_close(ours, full[..., ids].float(), rtol=1e-5, atol=1e-5)
    # what the protocol works around: transformers' own forward hides exactly these columns
    masked = shuffled.model(input_ids=seq).logits
    lowest = torch.finfo(masked.dtype).min
    assert (masked[..., ids] == lowest).all() and (masked[..., : int(ids.min())] > lowest).all()


@torch.no_grad()
def test_janus_image_logits_are_transformers_generation_head_on_its_image_embeddings(janus):
    seq = a_sequence_with_an_image(janus)
    is_image = seq >= janus.image_base
    text = janus.model.model.language_model.embed_tokens(torch.where(is_image, 0, seq))
    images = janus.model.prepare_embeddings_for_image_generation(seq[is_image] - janus.image_base)
    embeds = text.clone()
    embeds[is_image] = images
    hidden = janus.model.model.language_model(inputs_embeds=embeds).last_hidden_state
    theirs = janus.model.model.generation_head(hidden)
    ours, _ = janus.image_logits(seq)
    assert ours.shape == (*seq.shape, janus.layout.codebook_size)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)


def test_chameleon_training_sequences_end_with_lumina_mgpts_turn_end(tiny_backbone):
    """mini's pretraining sequences end as Lumina-mGPT's conversations do: <eoss>, then the turn end
    <reserved08706>, which the model learns to predict (so it stops after an image, as Lumina-mGPT does)."""
    from tokenbooth.pretrain.mini import training_batch
    from tokenbooth.toyworld import pretraining_scene

    layout, turn_end = tiny_backbone.layout, tiny_backbone.tokenizer.token_to_id("<reserved08706>")
    codes = torch.zeros(2, layout.rows, layout.cols, dtype=torch.long)
    ids, labels = training_batch(tiny_backbone, [pretraining_scene(0), pretraining_scene(1)], codes, [0, 1], step=0)
    for row, row_labels in zip(ids.tolist(), labels.tolist()):
        end = max(i for i, label in enumerate(row_labels) if label != -100)  # the last trained position
        assert row[end - 1 : end + 1] == [layout.image_end, turn_end] and row_labels[end] == turn_end


# --- trainable parameters --------------------------------------------------------------------------------

def test_chameleon_trainable_parameters_are_the_language_model_without_the_vq_model(tiny_backbone):
    names = set(tiny_backbone.trainable_parameters())
    every = {n for n, _ in tiny_backbone.model.named_parameters()}
    assert not any(".vqmodel." in n for n in names) and any(".vqmodel." in n for n in every)
    assert names == {n for n in every if ".vqmodel." not in n}
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= names


def test_janus_trainable_parameters_leave_out_the_vision_tower_and_both_image_tokenizer_sides(janus):
    names = set(janus.trainable_parameters())
    every = {n for n, _ in janus.model.named_parameters()}
    left_out = every - names
    assert left_out and all(n.startswith(("model.vision_model.", "model.aligner.", "model.vqmodel.")) for n in left_out)
    assert any(n.startswith("model.vision_model.") for n in left_out)
    assert any(n.startswith("model.language_model.layers.0.self_attn.") for n in names)
    assert any(n.startswith("model.generation_head.") for n in names)


@pytest.mark.parametrize("layers", ["vqmodel", r"\.quantize\."])
def test_layer_patterns_cannot_reach_the_vq_model(tiny_backbone, layers):
    with pytest.raises(UserError, match="matches no parameter"):
        select_layer_params(tiny_backbone, TrainConfig.for_family("mini", class_name="robot", layers=layers))


def test_an_invalid_layer_pattern_is_one_line(tiny_backbone):
    with pytest.raises(UserError, match="not a regular expression") as e:
        select_layer_params(tiny_backbone, TrainConfig.for_family("mini", class_name="robot", layers="q_proj,(unclosed"))
    assert "\n" not in str(e.value)


# --- the loss, in codes ----------------------------------------------------------------------------------

def batch_of(backbone, codes, seed=0):
    cfg = TrainConfig.for_family("mini", class_name="robot", batch_size=3)
    placeholder = Placeholder(backbone, cfg, torch.Generator().manual_seed(seed))
    ids, labels = make_batch(backbone, placeholder, cfg, codes, torch.Generator().manual_seed(seed), subject=True)
    return placeholder, ids, labels


def test_labels_are_codebook_indices_at_image_positions_only(shuffled):
    layout = shuffled.layout
    codes = torch.randint(layout.codebook_size, (2, layout.rows, layout.cols))
    _, ids, labels = batch_of(shuffled, codes)
    scored = labels >= 0
    assert int(scored.sum(1)[0]) == layout.rows * layout.cols
    assert torch.equal(layout.token_ids(labels[scored]), ids[scored])  # the code of the very token there


def test_the_loss_is_cross_entropy_over_image_codes_only(shuffled):
    layout = shuffled.layout
    codes = torch.randint(layout.codebook_size, (2, layout.rows, layout.cols))
    placeholder, ids, labels = batch_of(shuffled, codes)
    loss = batch_loss(shuffled, placeholder, ids, labels, lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():  # by hand: full-vocabulary logits, image columns picked, softmax over those
        hidden = shuffled.model.model(inputs_embeds=placeholder.embed(shuffled, ids)).last_hidden_state
        full = shuffled.model.lm_head(hidden)[:, :-1]
        targets = labels[:, 1:]
        scored = targets >= 0
        expected = F.cross_entropy(full[scored][:, layout.image_token_ids], targets[scored])
        text_too = F.cross_entropy(full[scored], layout.token_ids(targets[scored]))
    torch.testing.assert_close(loss.detach(), expected)
    assert loss < text_too  # the text columns take no probability mass away


def test_the_placeholder_gets_a_gradient_and_the_loss_falls(tiny_backbone):
    layout = tiny_backbone.layout
    codes = torch.randint(layout.codebook_size, (2, layout.rows, layout.cols), generator=torch.Generator().manual_seed(1))
    placeholder, ids, labels = batch_of(tiny_backbone, codes)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    optimizer = torch.optim.Adam([placeholder.embedding], lr=0.05)
    losses = []
    for _ in range(8):
        loss = batch_loss(tiny_backbone, placeholder, ids, labels, no_autocast)
        optimizer.zero_grad()
        loss.backward()
        assert placeholder.embedding.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# --- warnings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["plain", "sjd"])
def test_sampling_raises_no_deprecation_warning(tiny_backbone, sampler):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw(tiny_backbone, ["a cup"], SamplingConfig.for_family("mini", seed=0, sampler=sampler, sjd_window=8))
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_a_plain_sampling_run_prints_nothing_on_stderr(tiny_model_dir):
    """In a fresh process, as a user's run: transformers imports torchao when installed, which logs."""
    script = ("import sys; from tokenbooth.backbones import load_backbone; from tokenbooth.sampling import draw, "
              "SamplingConfig; draw(load_backbone(sys.argv[1]), ['a cup'], SamplingConfig.for_family('mini', seed=0))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(__import__("tokenbooth").__path__[0].rsplit(os.sep, 1)[0]),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_chameleon_attention_runs_in_float32_on_the_cpu_under_bf16_autocast_and_matches_sdpa(tiny_model_dir,
                                                                                              monkeypatch):
    """Why: PyTorch's CPU flash attention is slower in bf16 (benchmarks/attention.py); the switch must not
    change what the model computes beyond bf16 rounding."""
    from tokenbooth.backbones.hf import CPU_FLOAT32_SDPA

    backbone = load_backbone(tiny_model_dir)  # a fresh model: the attention switch is the model's state
    assert backbone.model.config._attn_implementation == CPU_FLOAT32_SDPA
    seen, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append({q.dtype, k.dtype, v.dtype})
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for name in (CPU_FLOAT32_SDPA, "sdpa"):
        backbone.model.set_attn_implementation(name)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = backbone.hidden_states(ids)[0].float()
        # plain SDPA gets bf16 values (autocast then runs the kernel in bf16); the switch hands it float32 only
        assert seen and all((dtypes == {torch.float32}) == (name == CPU_FLOAT32_SDPA) for dtypes in seen)
    assert torch.allclose(outputs[CPU_FLOAT32_SDPA], outputs["sdpa"], atol=0.05, rtol=0.05)
    backbone.model.set_attn_implementation(CPU_FLOAT32_SDPA)
    seen.clear()
    backbone.hidden_states(ids)  # float32 without autocast: plain SDPA, untouched
    assert seen and all(dtypes == {torch.float32} for dtypes in seen)


def test_the_float32_attention_masks_a_left_padded_batch_as_sdpa_does(tiny_model_dir):
    """A padded batch (what sampling several prompts builds) must give what plain SDPA gives: the attention's
    mask builder is registered with it, or transformers passes the raw padding mask and drops causality."""
    from tokenbooth.backbones.hf import CPU_FLOAT32_SDPA

    backbone = load_backbone(tiny_model_dir)
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second prompt is shorter: left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outputs = {}
    for name in (CPU_FLOAT32_SDPA, "sdpa"):
        backbone.model.set_attn_implementation(name)
        outputs[name] = backbone.hidden_states(ids, attention_mask=mask, position_ids=positions)[0]
    backbone.model.set_attn_implementation(CPU_FLOAT32_SDPA)
    assert torch.allclose(outputs[CPU_FLOAT32_SDPA][:, 7:], outputs["sdpa"][:, 7:], atol=1e-5)
