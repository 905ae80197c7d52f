"""Sampling on a quantized base wherever tokenbooth samples: a LoRA adapter goes on it unmerged (as QLoRA
trained it), an adapter trained on a quantized base samples on one by default and says so in one stderr line,
and `demo`, the web app and validation take the same choice through the same library path
(personalize/adapter.py: `sampling_quantization`, `load_for_sampling`)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quick, run_cli, subject_images

from tokenbooth.backbones.quantize import dense, quantize_layers
from tokenbooth.errors import UserError
from tokenbooth.personalize import adapter as adapter_files


def test_lora_over_a_quantized_weight_adds_its_low_rank_update_unmerged():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(128, 64, bias=False))
    quantize_layers([layer], "int8")
    a, b, x = torch.randn(4, 128), torch.randn(64, 4), torch.randn(3, 128)
    adapter_files._add_low_rank(layer, "0", 0.5, a, b)
    expected = x @ dense(layer[0].base.weight, torch.float32).T + 0.5 * (x @ a.T) @ b.T
    assert isinstance(layer[0], adapter_files.LowRankAdded)
    torch.testing.assert_close(layer(x), expected)


@pytest.fixture(scope="module")
def qlora_adapter(tiny_model_dir, tmp_path_factory):
    """A two-stage QLoRA adapter (LoRA on an int8 base) of the tiny model."""
    from tokenbooth.backbones import load_backbone
    from tokenbooth.personalize import load_reference_images, train

    folder = tmp_path_factory.mktemp("qlora")
    refs = load_reference_images(subject_images(folder / "refs"), 16)
    return train(load_backbone(str(tiny_model_dir)), refs,
                 quick("model", layers="lora", lora_rank=2, quantize="int8", stage2_lr=5e-2), folder / "adapter",
                 progress=False)


def test_a_qlora_adapter_samples_on_its_quantized_base_by_default_and_says_so(tiny_model_dir, qlora_adapter, capsys):
    from tokenbooth.backbones.quantize import is_quantized

    backbone, bits = adapter_files.load_for_sampling(str(tiny_model_dir), qlora_adapter, None, device="cpu")
    err = capsys.readouterr().err
    assert bits == "int8" and err.count("\n") == 1 and "sampling on a base quantized to int8" in err
    attention = backbone.decoder_layers()[0].self_attn
    assert isinstance(attention.q_proj, adapter_files.LowRankAdded) and is_quantized(attention.q_proj.base.weight)
    full, bits = adapter_files.load_for_sampling(str(tiny_model_dir), qlora_adapter, "none", device="cpu")
    assert bits == "none" and not isinstance(full.decoder_layers()[0].self_attn.q_proj, adapter_files.LowRankAdded)


def test_the_unmerged_lora_changes_the_quantized_models_output_as_the_merged_one_changes_the_full(
        tiny_model_dir, qlora_adapter):
    """Adapter on minus adapter off: the same change on the int8 base (unmerged) as on the full-precision one
    (merged), up to int8's rounding."""
    from tokenbooth.backbones import load_backbone

    ids = torch.tensor([[1, 5, 9, 12, 7]])

    def logits(model):
        with torch.no_grad():
            return model.image_logits(ids)[0]

    quantized_change = logits(adapter_files.load_for_sampling(str(tiny_model_dir), qlora_adapter, "int8",
                                                              device="cpu")[0]) \
        - logits(load_backbone(str(tiny_model_dir), device="cpu", quantize="int8"))
    full_change = logits(adapter_files.load_for_sampling(str(tiny_model_dir), qlora_adapter, "none", device="cpu")[0]) \
        - logits(load_backbone(str(tiny_model_dir), device="cpu"))
    assert full_change.abs().max() > 1e-3  # the adapter changes something
    cosine = torch.nn.functional.cosine_similarity(quantized_change.flatten(), full_change.flatten(), dim=0)
    assert cosine > 0.95, cosine


def test_generate_draws_a_qlora_adapter_on_its_base_and_records_it(tiny_model_dir, qlora_adapter, tmp_path, capsys):
    code, _, err = run_cli(capsys, "generate", "a [V] robot", "--model", tiny_model_dir, "--adapter", qlora_adapter,
                           "-n", 1, "--out", tmp_path / "o")
    assert code == 0, err
    assert "sampling on a base quantized to int8" in err
    assert json.loads((tmp_path / "o" / "generate.json").read_text())["quantize"] == "int8"


def test_full_layer_tensors_on_a_quantized_base_are_refused_before_loading(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / adapter_files.LAYERS).write_bytes(b"")
    with pytest.raises(UserError, match="less than a quantization step"):
        adapter_files.sampling_quantization("nf4", folder)


def test_the_web_apps_generate_draws_on_the_chosen_bits(tmp_path, tiny_model_dir):
    from tokenbooth.ui import models
    from tokenbooth.ui.workspace import Workspace

    workspace = Workspace(tmp_path / "ws")
    cache = models.Models()
    paths, settings = models.generate(cache, workspace, str(tiny_model_dir), None, "a red robot", 1,
                                      {"seed": 0}, quantize="nf4")
    assert settings["quantize"] == "nf4" and paths[0].is_file()
    assert models.read_png_settings(paths[0])["quantize"] == "nf4"
    _, full = models.generate(cache, workspace, str(tiny_model_dir), None, "a red robot", 1, {"seed": 0})
    assert full["quantize"] == "none"


def test_demo_quantize_trains_qlora_and_draws_every_row_on_the_quantized_base(monkeypatch, tmp_path):
    """The demo's flag reaches the recipe (LoRA over a 4-bit base) and both drawing models (stubbed: the
    demo's minute of training is tests/test_demo.py's)."""
    import tokenbooth.personalize.demo as demo

    seen = {}

    def fake_train(backbone, references, cfg, out):
        seen["train"] = (cfg.layers, cfg.quantize)
        raise SystemExit  # enough: what is trained is known

    monkeypatch.setattr(demo, "train", fake_train)
    with pytest.raises(SystemExit):
        demo.make_demo(tmp_path / "demo", quantize="nf4")
    assert seen["train"] == ("lora", "nf4")
