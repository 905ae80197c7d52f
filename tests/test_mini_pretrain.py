"""mini's pretraining pipeline (pretrain/mini.py) end to end at a toy size, on the CPU: the same steps and
`--device` plumbing a GPU run takes, in seconds."""

import torch

from tokenbooth.pretrain import mini
from tokenbooth.vq import VQGANConfig


def _toy_size(monkeypatch):
    # the last 1000 scenes are the VQGAN's held-out set, so 1010 leaves ten to train on
    monkeypatch.setattr(mini, "NUM_SCENES", 1010)
    monkeypatch.setattr(mini, "VQGAN_CONFIG", VQGANConfig(embed_dim=8, n_embed=64, z_channels=32, ch=32,
                                                          ch_mult=(1, 1, 1), num_res_blocks=1, resolution=64))
    monkeypatch.setattr(mini, "VQGAN_STEPS", 2)
    monkeypatch.setattr(mini, "VQGAN_BATCH", 2)
    monkeypatch.setattr(mini, "TRANSFORMER_CYCLES", ((3, 1e-3),))
    monkeypatch.setattr(mini, "TRANSFORMER_STEPS", 3)
    monkeypatch.setattr(mini, "TRANSFORMER_BATCH", 2)


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
