"""The paper's defaults, and the training options that had no test: --init-token, --flip, where Meta's
VQGAN is looked for, and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli, subject_images, write_meta_vqgan
from safetensors.torch import load_file

from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import TrainConfig, load_reference_images, train
from tokenbooth.sampling import SamplingConfig


# --- the paper's defaults --------------------------------------------------------------------------------

def test_lumina_mgpt_trains_and_samples_with_the_papers_settings():
    """Sun et al. 2025, Sec. 4.1: stage 1 for 1500 steps at lr 0.01, stage 2 for 70 steps at lr 5e-6, 8 pairs
    per step, Q/K/V of every layer, random [V]; sampling at CFG 4.0 with image top-k 2000."""
    cfg = TrainConfig.for_family("lumina-mgpt", class_name="dog")
    paper = (1500, 0.01, 70, 5e-6, 8)
    assert (cfg.stage1_steps, cfg.stage1_lr, cfg.stage2_steps, cfg.stage2_lr, cfg.batch_size) == paper
    assert (cfg.stages, cfg.layers, cfg.init_token) == ("two-stage", "qkv", None)
    sampling = SamplingConfig.for_family("lumina-mgpt")
    assert (sampling.cfg_scale, sampling.image_top_k) == (4.0, 2000)
    assert TrainConfig.for_family("lumina-mgpt", class_name="dog", stage2_steps=5).stage2_steps == 5  # flags win


def test_janus_pro_starts_from_the_papers_training_settings(janus_dir, tmp_path, capsys, monkeypatch):
    """`tokenbooth train` on a Janus-Pro folder hands the trainer the settings Lumina-mGPT trains with in the
    paper (it reports none for Janus-Pro); the run itself is replaced, the settings are what is checked."""
    import tokenbooth.commands.train as train_command

    received = []
    monkeypatch.setattr(train_command, "train", lambda backbone, images, cfg, out, **_: received.append(cfg))
    code, _, err = run_cli(capsys, "train", "--model", janus_dir, "--images", subject_images(tmp_path / "refs"),
                           "--class-name", "dog", "--output", tmp_path / "a")
    assert code == 0, err
    [cfg] = received
    paper = (1500, 0.01, 70, 5e-6, 8)
    assert (cfg.stage1_steps, cfg.stage1_lr, cfg.stage2_steps, cfg.stage2_lr, cfg.batch_size) == paper
    assert cfg == TrainConfig.for_family("lumina-mgpt", class_name="dog")


# --- --init-token -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["robot", "red robot"])  # several tokens each in the tiny tokenizer: their mean
def test_init_token_starts_the_placeholder_at_that_words_embedding(tiny_model_dir, tmp_path, capsys, word):
    backbone = load_backbone(str(tiny_model_dir))
    ids = backbone.tokenizer.encode(word, add_special_tokens=False).ids
    assert len(ids) > 1
    expected = backbone.input_embeddings().weight[ids].float().mean(0)
    out = tmp_path / "a"
    # one step at a learning rate far too small to move it: what is saved is where [V] started
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--images", subject_images(tmp_path / "refs"),
                           "--class-name", "robot", "--output", out, "--stages", "embedding", "--stage1-steps", "1",
                           "--stage1-lr", "1e-12", "--batch-size", "1", "--init-token", word)
    assert code == 0, err
    learned = load_file(str(out / "learned_embeds.safetensors"))["[V]"]
    torch.testing.assert_close(learned, expected, rtol=0, atol=1e-6)


# --- --flip ------------------------------------------------------------------------------------------------------

def test_flip_adds_a_mirrored_copy_of_every_reference(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from tokenbooth.backbones.chameleon import ChameleonBackbone

    encoded, real_encode = [], ChameleonBackbone.encode_images

    def spy(self, pixels):
        encoded.append(pixels.clone())
        return real_encode(self, pixels)

    monkeypatch.setattr(ChameleonBackbone, "encode_images", spy)
    refs = subject_images(tmp_path / "refs", n=3)
    code, _, err = run_cli(capsys, "train", "--model", tiny_model_dir, "--images", refs, "--class-name", "robot",
                           "--output", tmp_path / "a", "--stages", "embedding", "--stage1-steps", "1",
                           "--batch-size", "1", "--flip")
    assert code == 0, err
    pixels = torch.cat(encoded)  # the references may be encoded in one call or one at a time
    assert pixels.shape[0] == 6
    assert torch.equal(pixels[3:], pixels[:3].flip(-1))  # left-right mirror images, after the originals
    assert not torch.equal(pixels[3:], pixels[:3])


# --- where Meta's VQGAN is looked for ------------------------------------------------------------------------

def test_the_vqgan_is_taken_from_the_model_folder_then_the_environment_then_the_cache(tmp_path, monkeypatch):
    from tokenbooth.backbones.chameleon import find_vqgan
    from tokenbooth.vq import VQGAN, VQGANConfig, save_vqgan

    cfg = VQGANConfig(embed_dim=4, n_embed=16, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    model, env, cache = tmp_path / "model", tmp_path / "env", tmp_path / "xdg" / "tokenbooth" / "chameleon-vqgan"
    model.mkdir()
    for seed, folder in enumerate([model / "vqgan", env, cache]):
        if folder == env:  # Meta's format in one of the places, tokenbooth's in the others
            write_meta_vqgan(folder, cfg, seed=seed)
        else:
            torch.manual_seed(seed)
            save_vqgan(VQGAN(cfg), folder)
    codebooks = {}
    for seed in range(3):
        torch.manual_seed(seed)
        codebooks[seed] = VQGAN(cfg).quantize.embedding.weight.detach()

    def found():
        codebook = find_vqgan(model).quantize.embedding.weight
        return next(seed for seed, weight in codebooks.items() if torch.equal(codebook, weight))

    monkeypatch.setenv("TOKENBOOTH_VQGAN", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert found() == 0  # MODEL/vqgan first
    for f in (model / "vqgan").iterdir():
        f.unlink()
    assert found() == 1  # then $TOKENBOOTH_VQGAN
    monkeypatch.delenv("TOKENBOOTH_VQGAN")
    assert found() == 2  # then the cache


# --- gradient checkpointing --------------------------------------------------------------------------------

def test_gradient_checkpointing_recomputes_the_layers_and_trains_to_the_same_adapter(tiny_model_dir, tmp_path):
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    cfg = dict(stage1_steps=2, stage2_steps=2, stage1_lr=1e-2, stage2_lr=1e-3, batch_size=2, checkpointing_steps=100)
    results = {}
    for checkpointing in (False, True):
        backbone = load_backbone(str(tiny_model_dir))
        calls = []
        for layer in backbone.attention_layers():
            layer.register_forward_pre_hook(lambda module, args: calls.append(1))
        settings = TrainConfig.for_family("mini", class_name="robot", gradient_checkpointing=checkpointing, **cfg)
        out = train(backbone, refs, settings, tmp_path / str(checkpointing), progress=False)
        results[checkpointing] = (len(calls), {k: v for name in ("learned_embeds", "layers")
                                               for k, v in load_file(str(out / f"{name}.safetensors")).items()})
    (plain_calls, plain), (checkpointed_calls, checkpointed) = results[False], results[True]
    layers = len(load_backbone(str(tiny_model_dir)).attention_layers())
    assert plain_calls == 4 * layers and checkpointed_calls == 2 * 4 * layers  # each layer again in backward
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=0, atol=1e-6, msg=k)
