"""mini's pretraining pipeline (pretrain/mini.py) end to end at a toy size, on the CPU: the same steps and
`--device` plumbing a GPU run takes, in seconds."""

from dataclasses import replace

import torch

from tokenbooth.pretrain import mini
from tokenbooth.vq import VQGANConfig


def _toy_size(monkeypatch):
    # the last 1000 scenes are the VQGAN's held-out set, so 1010 leaves ten to train on
    toy = replace(mini.V2, vqgan=VQGANConfig(embed_dim=8, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 1, 1),
                                             num_res_blocks=1, resolution=64),
                  num_scenes=1010, vqgan_steps=2, vqgan_batch=2, transformer_cycles=((3, 1e-3),),
                  transformer_batch=2, model_dir=None)
    monkeypatch.setitem(mini.RECIPES, "v2", toy)
    return toy


def test_the_pipeline_runs_through_the_transformer_and_a_checkpoint_resumes_where_it_stopped(tmp_path, monkeypatch):
    _toy_size(monkeypatch)
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu"])
    for made in ("scenes.jsonl", "pixels.npy", "vqgan/vqgan.safetensors", "tokenizer.json", "codes.npy",
                 "transformer/model.safetensors"):
        assert (tmp_path / made).is_file(), made
    ck = mini.load_checkpoint(tmp_path / "transformer.ckpt")
    assert ck["step"] == 3 and all(t.device.type == "cpu" for t in ck["model"].values())
    # a run stopped after its checkpoint continues from it rather than starting over: mark the checkpoint's
    # weights (a fresh start would reproduce the unmarked ones exactly: every draw is seeded)
    (tmp_path / "transformer" / "model.safetensors").unlink()
    key = "model.layers.0.self_attn.q_proj.weight"
    ck["model"][key] += 1.0
    mini.save_checkpoint(tmp_path / "transformer.ckpt", **ck)
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu"])
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "transformer" / "model.safetensors")[key], ck["model"][key])


def _tiny_8x_recipe(monkeypatch):
    """v3's shape at a toy size: an 8x VQGAN trained elsewhere, exported to <work>/model."""
    toy = replace(mini.V3, vqgan=VQGANConfig(embed_dim=8, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1),
                                             num_res_blocks=1, resolution=64),
                  num_scenes=1010, transformer_cycles=((2, 1e-3), (1, 5e-4)), transformer_batch=2, hidden=64, layers=2,
                  heads=4)
    monkeypatch.setitem(mini.RECIPES, "v3", toy)
    return toy


def test_v3_trains_on_a_given_8x_tokenizer_and_exports_a_model_that_draws_64_tokens(tmp_path, monkeypatch):
    from tokenbooth.backbones import load_backbone
    from tokenbooth.vq import VQGAN, save_vqgan

    toy = _tiny_8x_recipe(monkeypatch)
    save_vqgan(VQGAN(toy.vqgan), tmp_path / "pilot-vqgan")
    work = tmp_path / "run"
    mini.main(["all", "--recipe", "v3", "--vqgan", str(tmp_path / "pilot-vqgan"), "--work", str(work),
               "--device", "cpu"])
    assert not (work / "vqgan" / "decoder_finetuned").exists()  # v3 keeps the pilot's decoder
    backbone = load_backbone(str(work / "model"))
    layout = backbone.layout
    assert backbone.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 8, 8)
    assert (layout.rows, layout.cols, layout.codebook_size) == (8, 8, 64)
    assert layout.body_length == 8 * 9 + 1  # rows of 8 codes and a row end, then the image's end
    # stored in bf16 to fit the package, held in fp32 once loaded, as mini trains
    from safetensors import safe_open
    with safe_open(str(work / "model" / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight")
    assert stored.dtype == torch.bfloat16
    held = backbone.model.get_input_embeddings().weight
    assert held.dtype == torch.float32 and torch.equal(held.cpu(), stored.float())
    # the first cycle's end was kept, and exports as a model of its own
    mini.export(work, toy, transformer=work / "transformer-step2", folder=work / "model-step2")
    assert load_backbone(str(work / "model-step2")).layout.rows == 8


def test_v3_without_a_tokenizer_or_with_the_wrong_one_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    from tokenbooth.vq import VQGAN, save_vqgan

    _tiny_8x_recipe(monkeypatch)
    with pytest.raises(SystemExit) as missing:
        mini.main(["vqgan", "--recipe", "v3", "--work", str(tmp_path / "a"), "--device", "cpu"])
    assert "--vqgan" in str(missing.value) and "mini_v3_pilot" in str(missing.value)
    save_vqgan(VQGAN(VQGANConfig(embed_dim=8, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                                 resolution=64)), tmp_path / "4x")
    with pytest.raises(SystemExit) as wrong:
        mini.main(["vqgan", "--recipe", "v3", "--vqgan", str(tmp_path / "4x"), "--work", str(tmp_path / "b"),
                   "--device", "cpu"])
    assert str(wrong.value).startswith("tokenbooth: error: --vqgan") and "\n" not in str(wrong.value)
    assert not (tmp_path / "b" / "vqgan").exists()


def test_max_minutes_stops_the_transformer_checkpointed_and_a_second_run_finishes_it(tmp_path, monkeypatch):
    toy = _toy_size(monkeypatch)
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu", "--max-minutes", "0"])
    assert mini.load_checkpoint(tmp_path / "transformer.ckpt")["step"] == 1
    assert not (tmp_path / "transformer").exists()
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu"])
    assert mini.load_checkpoint(tmp_path / "transformer.ckpt")["step"] == toy.transformer_steps
    assert (tmp_path / "transformer" / "model.safetensors").is_file()


def test_a_resumed_run_logs_the_mean_loss_and_pace_of_the_steps_it_ran(tmp_path, monkeypatch, capsys):
    toy = _toy_size(monkeypatch)
    monkeypatch.setitem(mini.RECIPES, "v2", replace(toy, transformer_cycles=((26, 1e-3),)))
    real_loss = mini.sequence_loss
    # every step's loss reads 2.0 (its gradient untouched), so the logged mean must too, whatever the window
    monkeypatch.setattr(mini, "sequence_loss", lambda *a: (lambda loss: loss - loss.detach() + 2.0)(real_loss(*a)))
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu", "--max-minutes", "0"])
    capsys.readouterr()
    mini.main(["transformer", "--work", str(tmp_path), "--device", "cpu"])
    logged = [line for line in capsys.readouterr().out.splitlines() if "transformer step 25 " in line]
    assert len(logged) == 1 and " loss 2.0000 " in logged[0], logged
