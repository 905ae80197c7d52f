"""Emu3 through tokenbooth equals Emu3 through transformers, on a tiny random-weight Emu3 in the real format.

- Sampling. tokenbooth's plain sampler and transformers' `generate` (BAAI's recipe: the negative prompt as
  `negative_prompt_ids`, guidance 3, the prefix constraint of BAAI's `Emu3PrefixConstrainedLogitsHelper`)
  give the same image tokens when both are greedy (top-k 1), and the same distribution at every image step
  when both sample. Sampled tokens cannot be compared draw for draw: transformers draws with
  torch.multinomial over the whole 184,622-column vocabulary (the image columns sit after the text ones, so
  its random stream is spent on columns tokenbooth never scores), tokenbooth with one uniform per row over
  the K image codes (sampling/processors.py `sample`). So the sampled test follows transformers' draws and
  checks, step by step, that tokenbooth's sampler (its KV cache, batched guidance rows, structure tokens)
  would draw each from the same distribution.
- The VQ-VAE: tokenbooth's codes and pixels equal Emu3ImageProcessor + Emu3VQVAE.encode / decode + postprocess.
- A personalization step's loss equals the cross-entropy written out by hand on transformers' forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import EMU3_RES, quick, subject_images, write_emu3_folder
from PIL import Image

from tokenbooth.backbones import load_backbone
from tokenbooth.backbones.families import family_defaults
from tokenbooth.personalize.recipe import Placeholder, enable_gradient_checkpointing, make_batch, train_step
from tokenbooth.sampling import SamplingConfig, sample_image_tokens
from tokenbooth.vq import pil_to_tensor, tensor_to_pil

PROMPT = "a red robot on the beach"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_emu3_folder(tmp_path_factory.mktemp("emu3-peaked") / "tiny-emu3", peaked=True)


@pytest.fixture(scope="module")
def backbone(folder):
    return load_backbone(str(folder), resolution=EMU3_RES, dtype=torch.float32)


@pytest.fixture(scope="module")
def processor(folder):
    from transformers import Emu3Processor

    return Emu3Processor.from_pretrained(folder)


def transformers_generate(backbone, processor, **sampling):
    """Emu3-Gen as BAAI samples it (README "Quickstart"), through transformers' generate."""
    area = EMU3_RES * EMU3_RES
    inputs = processor(text=[PROMPT], return_for_image_generation=True, image_area=area, return_tensors="pt")
    negative = processor(text=[family_defaults("emu3").negative_prompt], return_for_image_generation=True,
                         image_area=area, return_tensors="pt")
    tok, (height, width) = processor.tokenizer, inputs["image_sizes"][0]
    visual = backbone.model.vocabulary_mapping.image_tokens
    ends = {0: tok.convert_tokens_to_ids("<|extra_200|>"), 1: tok.eof_token_id, 2: tok.eoi_token_id,
            3: tok.eos_token_id}
    block = (width + 1) * height

    def allowed(batch_id, ids):  # BAAI's Emu3PrefixConstrainedLogitsHelper, offsets from <|image token|>
        offset = ids.shape[0] - int((ids == tok.image_wrapper_token_id).nonzero()[0][0])
        if offset > block:
            return [ends.get(offset - block, tok.pad_token_id)]
        return [ends[0]] if offset % (width + 1) == 0 else visual

    out = backbone.model.generate(
        inputs["input_ids"], attention_mask=inputs["attention_mask"],
        max_new_tokens=sampling.pop("max_new_tokens", block + 3),
        prefix_allowed_tokens_fn=allowed, negative_prompt_ids=negative["input_ids"],
        negative_prompt_attention_mask=negative["attention_mask"], pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, return_dict_in_generate=True, output_scores=True, **sampling)
    body = out.sequences[:, inputs["input_ids"].shape[1]:][:, :backbone.layout.body_length]
    return body, out.scores


def test_greedy_sampling_draws_the_image_tokens_of_transformers_emu3_generate(backbone, processor):
    theirs, _ = transformers_generate(backbone, processor, do_sample=False, guidance_scale=3.0)
    ours = sample_image_tokens(backbone, [PROMPT], SamplingConfig.for_family("emu3", seed=0, image_top_k=1))
    assert len(set(ours.flatten().tolist())) > 3  # not a degenerate picture
    assert torch.equal(backbone.layout.codes_from_body(theirs), ours)


def test_every_image_step_draws_from_the_distribution_transformers_generate_draws_from(backbone, processor,
                                                                                       monkeypatch):
    torch.manual_seed(0)
    # temperature 10 spreads the peaked test model's distributions (tokenbooth and transformers apply it alike)
    theirs, scores = transformers_generate(backbone, processor, do_sample=True, top_k=16, guidance_scale=3.0,
                                           temperature=10.0)
    layout = backbone.layout
    image_steps = [j for j in range(layout.body_length) if layout.forced_token(j) is None]
    their_codes = layout.codes_from_body(theirs).flatten()
    assert len(set(their_codes.tolist())) > 3
    seen = []

    def follow_transformers(probs, generator):  # tokenbooth's sampler, forced along transformers' draws
        seen.append(probs.clone())
        return their_codes[len(seen) - 1 : len(seen)]

    monkeypatch.setattr("tokenbooth.sampling.sampler.sample", follow_transformers)
    sample_image_tokens(backbone, [PROMPT], SamplingConfig.for_family("emu3", seed=0, image_top_k=16, temperature=10.0))
    assert len(seen) == len(image_steps) == layout.rows * layout.cols
    for probs, j in zip(seen, image_steps):
        theirs_probs = scores[j].float().softmax(-1)[0]
        assert float(theirs_probs[layout.image_token_ids].sum()) == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(probs[0], theirs_probs[layout.image_token_ids], rtol=1e-4, atol=1e-5)
        assert int((probs[0] > 0).sum()) == 16 and float(probs[0].max()) < 0.9  # top-k, and a real choice


def test_the_negative_prompt_is_what_guidance_pushes_away_from(backbone, processor, monkeypatch):
    """The test above can fail: with another unconditional row (the header alone) the first step differs."""
    _, scores = transformers_generate(backbone, processor, do_sample=False, guidance_scale=3.0, max_new_tokens=1)
    header_only = backbone.layout.header
    monkeypatch.setattr(type(backbone), "unconditional_ids", lambda self, ids=None: [ids[0], *header_only])
    seen = []

    def record(probs, generator):
        seen.append(probs)
        return torch.zeros(1, dtype=torch.long)

    monkeypatch.setattr("tokenbooth.sampling.sampler.sample", record)
    sample_image_tokens(backbone, [PROMPT], SamplingConfig.for_family("emu3", seed=0, image_top_k=64))
    theirs = scores[0].float().softmax(-1)[0][backbone.layout.image_token_ids]
    assert not torch.allclose(seen[0][0], theirs, atol=1e-3)


def reference_pictures(tmp_path) -> list:
    return [Image.open(p).convert("RGB") for p in sorted(subject_images(tmp_path / "refs", size=EMU3_RES).iterdir())]


# --- the VQ-VAE -------------------------------------------------------------------------------------------

def test_codes_and_pixels_equal_emu3_image_processor_and_vq_vae(backbone, processor, tmp_path):
    images = reference_pictures(tmp_path)
    vq = backbone.model.model.vqmodel
    with torch.no_grad():
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        theirs = torch.stack(list(vq.encode(pixel_values, [[EMU3_RES, EMU3_RES]] * len(images)).image_tokens))
        ours = backbone.encode_images(pil_to_tensor(images))
        assert torch.equal(ours, theirs.long())
        decoded = vq.decode(theirs)
        their_pictures = processor.postprocess(list(decoded), return_tensors="PIL.Image.Image")["pixel_values"]
        ours_pixels = backbone.decode_images(ours)
    torch.testing.assert_close((ours_pixels + 1) / 2, (decoded * 0.5 + 0.5).clamp(0, 1), rtol=0, atol=1e-4)
    for mine, theirs_picture in zip(tensor_to_pil(ours_pixels), their_pictures):
        difference = np.abs(np.asarray(mine, dtype=int) - np.asarray(theirs_picture, dtype=int))
        assert difference.max() <= 1  # rounding to 8 bits, at most one level apart


# --- a personalization step's loss, by hand ------------------------------------------------------------------

def test_a_personalization_steps_loss_is_the_image_code_cross_entropy_by_hand(folder, tmp_path):
    backbone = load_backbone(str(folder), resolution=EMU3_RES, dtype=torch.float32)
    cfg = quick("model", batch_size=2, gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(0)
    placeholder = Placeholder(backbone, cfg, generator)
    codes = backbone.encode_images(pil_to_tensor(reference_pictures(tmp_path)))
    ids, labels = make_batch(backbone, placeholder, cfg, codes, generator, subject=True)
    layout = backbone.layout

    # by hand, on transformers' own forward pass: [V]'s row replaced, the whole vocabulary's logits, the image
    # columns picked in codebook order, cross-entropy at the positions that predict an image token
    embedding = placeholder.embedding.detach().clone().requires_grad_(True)
    embeds = backbone.model.get_input_embeddings()(ids)
    embeds = torch.where((ids == placeholder.token_ids[0])[..., None], embedding, embeds)
    logits = backbone.model(inputs_embeds=embeds).logits[:, :-1]
    targets = labels[:, 1:]
    scored = targets >= 0
    assert int(scored.sum()) == 2 * layout.rows * layout.cols  # every image token, no row end, no eof
    assert torch.equal(layout.token_ids(targets[scored]), ids[:, 1:][scored])
    by_hand = F.cross_entropy(logits[scored][:, layout.image_token_ids], targets[scored])
    by_hand.backward()

    enable_gradient_checkpointing(backbone)  # layers in training mode: Emu3's attention dropout must be off
    optimizer = torch.optim.SGD([placeholder.embedding], lr=0.0)
    grads = []
    placeholder.embedding.register_hook(lambda g: grads.append(g.clone()))
    loss = train_step(backbone, placeholder, [(ids, labels, 1.0)], cfg, optimizer, [placeholder.embedding],
                      lambda: torch.autocast("cpu", enabled=False))
    torch.testing.assert_close(loss, by_hand.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], embedding.grad, rtol=1e-4, atol=1e-7)
