"""Personalization has the effect it claims, measured from outside: [V]'s row is what learns, a LoRA adapter
loads as W + (alpha / r) B A, and the images change. Each test here was checked against a mutation of the
code that the older tests let through (see the test's docstring)."""

from __future__ import annotations

import json

import torch
from helpers import quick
from safetensors.torch import load_file

from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import load_adapter, train
from tokenbooth.sampling import SamplingConfig, draw_codes


def checkpointed_placeholder(out, step: int) -> torch.Tensor:
    return load_file(str(out / "checkpoints" / f"step-{step}" / "trainable.safetensors"))["placeholder"]


def test_the_placeholder_row_learns_in_stage_1_and_keeps_learning_in_stage_2(tiny_model_dir, refs, tmp_path):
    """Caught mutation: [V] left as literal text in the training prompts (its row never used)."""
    out = train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", checkpointing_steps=1), tmp_path / "a",
                progress=False)
    after = {step: checkpointed_placeholder(out, step) for step in range(1, 6)}  # 3 steps of stage 1, 2 of stage 2
    for step in (2, 3):
        assert not torch.equal(after[step], after[step - 1]), f"[V] did not move at stage-1 step {step}"
    for step in (4, 5):
        assert not torch.equal(after[step], after[step - 1]), f"[V] did not move at stage-2 step {step - 3}"
    assert torch.equal(load_file(str(out / "learned_embeds.safetensors"))["[V]"], after[5])


def test_training_batches_hold_the_placeholder_token_not_its_text(tiny_model_dir, refs, tmp_path, monkeypatch):
    """Caught mutation: [V] left as literal text in the training prompts."""
    import tokenbooth.personalize.recipe as recipe

    backbone = load_backbone(str(tiny_model_dir))
    token = backbone.placeholder_candidates()[0]
    token_id = backbone.tokenizer.token_to_id(token)
    as_text = backbone.tokenizer.encode("[V]", add_special_tokens=False).ids
    batches, real_make_batch = [], recipe.make_batch

    def spy(*args, **kwargs):
        batch = real_make_batch(*args, **kwargs)
        batches.append(batch[0])
        return batch

    monkeypatch.setattr(recipe, "make_batch", spy)
    train(backbone, refs, quick("bfloat16"), tmp_path / "a", progress=False)
    assert len(batches) == 5
    for ids in batches:  # every subject prompt names [V] once, as its reserved token
        assert ((ids == token_id).sum(dim=1) == 1).all()
        assert token_id not in as_text and not _contains(ids[0].tolist(), as_text)


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i: i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def lora_run(tiny_model_dir, refs, out):
    # a strong stage-2 step, so the learned B A is large enough to change what the model draws
    cfg = quick("bfloat16", layers="lora", lora_rank=2, stage2_lr=5e-2, stage2_steps=3)
    return train(load_backbone(str(tiny_model_dir)), refs, cfg, out, progress=False)


def test_a_loaded_lora_adapter_is_the_base_weight_plus_alpha_over_r_times_b_a(tiny_model_dir, refs, tmp_path):
    """Caught mutation: LoRA loading switched off (the adapter's B A never merged)."""
    out = lora_run(tiny_model_dir, refs, tmp_path / "lora")
    base = {k: v.detach().clone() for k, v in load_backbone(str(tiny_model_dir)).model.named_parameters()}
    loaded = dict(load_adapter(load_backbone(str(tiny_model_dir)), out).model.named_parameters())
    tensors = load_file(str(out / "lora" / "adapter_model.safetensors"))
    lora_config = json.loads((out / "lora" / "adapter_config.json").read_text())
    scale = lora_config["lora_alpha"] / lora_config["r"]
    a_keys = {k.split(".lora_A.")[0].removeprefix("base_model.model."): k for k in tensors if ".lora_A." in k}
    assert len(a_keys) == 2 * 3  # Q, K and V of both layers
    for module, a_key in a_keys.items():
        a, b = tensors[a_key].double(), tensors[a_key.replace(".lora_A.", ".lora_B.")].double()
        delta = scale * (b @ a)
        assert delta.abs().max() > 1e-3, f"{module}: the adapter learned next to nothing"
        expected = (base[module + ".weight"].double() + delta).to(base[module + ".weight"].dtype)
        torch.testing.assert_close(loaded[module + ".weight"], expected, rtol=0, atol=1e-6)
    untouched = [k for k in base if k.removesuffix(".weight") not in a_keys and "embed_tokens" not in k]
    assert all(torch.equal(base[k], loaded[k]) for k in untouched)


def test_a_lora_adapter_changes_what_the_model_draws_even_without_the_placeholder(tiny_model_dir, refs, tmp_path):
    """Caught mutation: LoRA loading switched off. Without [V] in the prompt only the layers can differ."""
    out = lora_run(tiny_model_dir, refs, tmp_path / "lora")
    greedy = SamplingConfig.for_family("mini", image_top_k=1, seed=3)
    prompts = ["a robot on the beach", "a robot in the snow"]
    base = draw_codes(load_backbone(str(tiny_model_dir)), prompts, greedy)
    personalized = draw_codes(load_adapter(load_backbone(str(tiny_model_dir)), out), prompts, greedy)
    assert (base != personalized).float().mean() > 0.1
