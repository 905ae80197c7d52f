"""Emu3 (BAAI/Emu3-Gen-hf) as published, proven on a tiny random-weight Emu3 written in the real format:
transformers' save_pretrained of the model, the processor and the tokenizer (helpers.write_emu3_folder). The
layout against Emu3Processor, the protocol (image logits, trainable parameters, [V]'s row), every training
path, the command line, the Hub cache name, the web app's list, `plan`, and the refusals. transformers' own
generate, the VQ-VAE and the loss by hand: test_emu3_equivalence.py."""

from __future__ import annotations

import json
import re
import shutil
import socket

import pytest
import torch
from helpers import EMU3_RES, cache_repo, quick, run_cli, subject_images, write_emu3_folder, write_janus_folder
from safetensors.torch import load_file, save_file

from tokenbooth.backbones import emu3, load_backbone
from tokenbooth.backbones.families import family_defaults
from tokenbooth.errors import UserError
from tokenbooth.personalize import load_adapter, load_reference_images, train
from tokenbooth.sampling import SamplingConfig
from tokenbooth.sampling.sampler import sample_image_body
from tokenbooth.sampling.sjd import sample_image_body_sjd


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory):
    return write_emu3_folder(tmp_path_factory.mktemp("published") / "tiny-emu3")


@pytest.fixture
def backbone(emu3_dir):
    return load_backbone(str(emu3_dir), resolution=EMU3_RES, dtype=torch.float32)


@pytest.fixture(scope="module")
def processor(emu3_dir):
    from transformers import Emu3Processor

    return Emu3Processor.from_pretrained(emu3_dir)


def refs_for(tmp_path):
    return load_reference_images(subject_images(tmp_path / "refs", size=EMU3_RES), EMU3_RES)


# --- the layout, as Emu3Processor builds it -----------------------------------------------------------------

def test_prompt_and_negative_row_are_what_emu3_processor_builds_for_image_generation(backbone, processor):
    area = EMU3_RES * EMU3_RES
    for prompt in ["a cup on the grass", "a red robot"]:
        theirs = processor(text=[prompt], return_for_image_generation=True, image_area=area)
        assert backbone.prompt_ids(prompt) == theirs["input_ids"][0]
        assert theirs["image_sizes"] == [[4, 4]] == [[backbone.layout.rows, backbone.layout.cols]]
    negative = family_defaults("emu3").negative_prompt
    theirs = processor(text=[negative], return_for_image_generation=True, image_area=area)["input_ids"][0]
    assert backbone.unconditional_ids(backbone.prompt_ids("a cup")) == theirs  # BAAI: mode 'G' for the negative too
    tokens = processor.tokenizer.convert_ids_to_tokens(theirs)
    assert tokens[0] == "<|extra_203|>" and tokens[-5:] == ["<|image start|>", "4", "*", "4", "<|image token|>"]


def test_image_block_has_row_ends_then_eof_and_a_training_sequence_ends_with_eoi(backbone):
    layout, tok = backbone.layout, backbone.tokenizer
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(layout.codebook_size, (1, layout.rows, layout.cols), generator=generator)
    body = layout.body_from_codes(codes)[0]
    # transformers' own conversion of codes to the sequence: each row, then <|extra_200|>
    rows = backbone.model.model.vocabulary_mapping.convert_img2bpe(codes[0]).flatten()
    assert torch.equal(body[:-1], rows.long())
    assert body[-1] == tok.token_to_id("<|extra_201|>") and layout.trailer == (tok.token_to_id("<|image end|>"),)
    assert layout.row_end == tok.token_to_id("<|extra_200|>") and layout.body_length == 4 * 5 + 1
    assert [tok.id_to_token(int(i)) for i in layout.image_token_ids[:2]] == ["<|visual token 000000|>",
                                                                            "<|visual token 000001|>"]


# --- the protocol ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_image_logits_are_the_lm_heads_visual_rows_in_codebook_order(backbone):
    layout = backbone.layout
    codes = torch.randint(layout.codebook_size, (1, layout.rows, layout.cols))
    seq = torch.tensor([backbone.prompt_ids("a red robot") + layout.body_from_codes(codes)[0].tolist()])
    ours, _ = backbone.image_logits(seq)
    full = backbone.model(input_ids=seq).logits
    assert ours.shape == (*seq.shape, layout.codebook_size)
    torch.testing.assert_close(ours, full[..., layout.image_token_ids].float(), rtol=1e-5, atol=1e-5)


def test_the_image_head_takes_a_view_of_consecutive_rows_and_indexes_others():
    assert emu3.image_rows([151854, 151855, 151856], "cpu") == slice(151854, 151857)
    assert torch.equal(emu3.image_rows([5, 3, 4], "cpu"), torch.tensor([5, 3, 4]))


def test_trainable_parameters_are_the_language_model_never_the_vq_vae(backbone):
    names = set(backbone.trainable_parameters())
    every = {n for n, _ in backbone.model.named_parameters()}
    assert every - names == {n for n in every if n.startswith("model.vqmodel.")} != set()
    assert {"model.text_model.embed_tokens.weight", "lm_head.weight",
            "model.text_model.layers.0.self_attn.q_proj.weight"} <= names


def test_placeholder_is_a_reserved_extra_token_with_its_own_row(backbone):
    candidates = backbone.placeholder_candidates()
    assert candidates[0] == "<|extra_1|>" and "<|extra_0|>" not in candidates
    used = {*backbone.layout.header, backbone.layout.row_end, backbone.layout.image_end, *backbone.layout.trailer,
            backbone.tokenizer.token_to_id(emu3.BOS)}
    ids = [backbone.tokenizer.token_to_id(t) for t in candidates]
    assert not used & set(ids) and max(ids) < backbone.input_embeddings().num_embeddings


def test_attention_dropout_is_off_so_checkpointing_changes_nothing(backbone):
    assert backbone.model.config.text_config.attention_dropout > 0  # BAAI's config keeps its pretraining value
    layers = backbone.decoder_layers()
    assert all(layer.self_attn.attention_dropout == 0.0 and layer.dropout.p == 0.0 for layer in layers)


def test_family_defaults_are_baais_sampling_settings():
    cfg = SamplingConfig.for_family("emu3")
    assert (cfg.cfg_scale, cfg.image_top_k) == (3.0, 2048)
    assert family_defaults("emu3").negative_prompt.startswith("lowres, bad anatomy, bad hands")


def test_loads_in_bfloat16_by_default_with_the_vq_vae_in_float32(emu3_dir):
    b = load_backbone(str(emu3_dir), resolution=EMU3_RES)
    assert b.model.model.text_model.embed_tokens.weight.dtype == torch.bfloat16
    assert b.vq.quantize.embedding.weight.dtype == torch.float32


def test_generated_body_has_the_structure_and_sjd_greedy_equals_plain_greedy(backbone):
    cfg = SamplingConfig.for_family("emu3", seed=0, image_top_k=1)
    prompts = ["a red robot", "a cup on the grass"]
    plain = sample_image_body(backbone, prompts, cfg)
    layout = backbone.layout
    assert all(plain[:, j].tolist() == [layout.forced_token(j)] * 2 for j in range(layout.body_length)
               if layout.forced_token(j) is not None)
    assert torch.equal(sample_image_body_sjd(backbone, prompts, cfg), plain)


# --- training: every path ---------------------------------------------------------------------------------

def values(backbone):
    return {n: p.detach().clone() for n, p in backbone.model.named_parameters()}


def changed(before, backbone):
    return {n for n, p in backbone.model.named_parameters() if not torch.equal(before[n], p.detach())}


def test_stage1_changes_no_model_weight_and_stage2_only_the_qkv_projections(emu3_dir, tmp_path):
    refs = refs_for(tmp_path)
    b = load_backbone(str(emu3_dir), resolution=EMU3_RES, dtype=torch.float32)
    before = values(b)
    train(b, refs, quick("model", stage1_steps=2, stages="embedding"), tmp_path / "s1", progress=False)
    assert changed(before, b) == set()
    b = load_backbone(str(emu3_dir), resolution=EMU3_RES, dtype=torch.float32)
    before = values(b)
    out = train(b, refs, quick("model", stage1_steps=2), tmp_path / "s2", progress=False)
    moved = changed(before, b)
    qkv = re.compile(r"model\.text_model\.layers\.\d+\.self_attn\.[qkv]_proj\.weight")
    assert moved and all(qkv.fullmatch(n) for n in moved)
    assert set(load_file(str(out / "layers.safetensors"))) == moved


def test_lora_qlora_and_prior_preservation_train_and_reload(emu3_dir, tmp_path):
    pytest.importorskip("torchao")
    refs = refs_for(tmp_path)
    b = load_backbone(str(emu3_dir), resolution=EMU3_RES, dtype=torch.float32)
    out = train(b, refs, quick("model", stage1_steps=1, stage2_steps=1, layers="lora", lora_rank=2, quantize="nf4",
                               prior_preservation=True, num_class_images=2), tmp_path / "qlora", progress=False)
    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert lora and all(".text_model.layers." in k for k in lora)
    reloaded = load_adapter(load_backbone(str(emu3_dir), resolution=EMU3_RES, dtype=torch.float32), out)
    assert reloaded.placeholder_token == "<|extra_1|>"


def test_train_then_generate_plain_and_sjd_from_the_command_line(emu3_dir, tmp_path, capsys):
    refs = subject_images(tmp_path / "refs", size=EMU3_RES)
    code, _, err = run_cli(capsys, "train", "--model", emu3_dir, "--resolution", EMU3_RES, "--images", refs,
                           "--class-name", "robot", "--output", tmp_path / "adapter", "--stage1-steps", "1",
                           "--stage2-steps", "1", "--batch-size", "2")
    assert code == 0, err
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert recorded["sampling"]["cfg_scale"] == 3.0 and recorded["sampling"]["image_top_k"] == 2048
    for sampler in ("plain", "sjd"):
        code, _, err = run_cli(capsys, "generate", "a [V] robot on the beach", "--model", emu3_dir, "--resolution",
                               EMU3_RES, "--adapter", tmp_path / "adapter", "-n", "1", "--sampler", sampler,
                               "--out", tmp_path / f"gen-{sampler}")
        assert code == 0, err
        from PIL import Image

        assert Image.open(tmp_path / f"gen-{sampler}" / "image-000.png").size == (EMU3_RES, EMU3_RES)


# --- names, the cache, the web app, plan ------------------------------------------------------------------------

def test_emu3_gen_loads_from_the_hugging_face_cache_offline_and_is_in_the_web_apps_list(emu3_dir, tmp_path,
                                                                                         monkeypatch):
    from tokenbooth.ui.models import available_models, family_of

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the Hugging Face cache .*hf download BAAI/Emu3-Gen-hf"):
        load_backbone("emu3-gen")
    assert "emu3-gen" not in available_models("mini")
    cache_repo(tmp_path / "hub", "BAAI/Emu3-Gen-hf", emu3_dir)
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("tokenbooth reached the network"))
    b = load_backbone("emu3-gen", resolution=EMU3_RES)
    assert b.family == "emu3" and b.name == "emu3-gen" and b.resolution == EMU3_RES
    assert "emu3-gen" in available_models("mini") and family_of("emu3-gen") == family_of(str(emu3_dir)) == "emu3"


def test_plan_builds_emu3_gen_at_its_real_size_without_memory():
    from tokenbooth.plan.blueprints import blueprint
    from tokenbooth.plan.tracker import fake_run

    with fake_run() as live:
        b = blueprint("emu3-gen", layers=2)
        assert b.family == "emu3" and b.resolution == 720
        assert b.layout.rows == b.layout.cols == 90 and b.layout.body_length == 90 * 91 + 1
        assert b.layout.header[0] == 151852 and b.layout.header[-1] == 151851 and b.layout.image_end == 151847
        assert b.model.model.vocabulary_mapping.img2bpe[0] == 151854 and b.layout.codebook_size == 32768
        assert sum(p.numel() for p in b.vq.parameters()) == 270_740_287
    assert live.peak > 4e9  # embeddings, LM head and the VQ-VAE counted as if allocated, and nothing was


def test_plan_command_covers_emu3(capsys, emu3_dir):
    code, out, err = run_cli(capsys, "plan", "--model", emu3_dir, "--resolution", EMU3_RES, "--json",
                             "--batch-size", "2", "-n", "1")
    assert code == 0, err
    assert json.loads(out)["peak_bytes"] > 0


# --- refusals: one line, non-zero --------------------------------------------------------------------------------

def broken_copy(emu3_dir, tmp_path, name="broken"):
    folder = tmp_path / name
    shutil.copytree(emu3_dir, folder)
    return folder


def without_vq_weights(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("vqmodel.")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def without_processor_files(folder):
    (folder / "processor_config.json").unlink()


def as_baais_original_release(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "Emu3"}))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "tokenizer.json").unlink(), r"Emu3 text tokenizer missing: .*tokenizer.json"),
    (without_processor_files, r"Emu3 processor files missing: .*processor_config.json"),
    (without_vq_weights, r"Emu3 VQ model missing from .*vqmodel"),
    (as_baais_original_release, r"BAAI's original Emu3 release .*hf download BAAI/Emu3-Gen-hf"),
])
def test_a_broken_folder_is_one_line(emu3_dir, tmp_path, capsys, damage, message):
    folder = broken_copy(emu3_dir, tmp_path)
    damage(folder)
    code, _, err = run_cli(capsys, "generate", "a cup", "--model", folder, "--resolution", EMU3_RES,
                           "--out", tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("resolution", [36, 0, 8 * 15])
def test_a_resolution_emu3_cannot_draw_is_one_line(emu3_dir, tmp_path, capsys, resolution):
    """36: not a multiple of the VQ's 8 pixels; 120: 15 x 16 tokens do not fit the tiny model's 256 positions."""
    code, _, err = run_cli(capsys, "generate", "a cup", "--model", emu3_dir, "--resolution", resolution,
                           "--out", tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "multiple of 8 pixels, up to" in err


def test_an_adapter_trained_on_another_family_is_one_line(emu3_dir, tmp_path, capsys):
    janus = write_janus_folder(tmp_path / "janus")
    code, _, err = run_cli(capsys, "train", "--model", janus, "--images", subject_images(tmp_path / "refs"),
                           "--class-name", "robot", "--output", tmp_path / "janus-adapter", "--stages", "embedding",
                           "--stage1-steps", "1", "--batch-size", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "a [V] robot", "--model", emu3_dir, "--resolution", EMU3_RES,
                           "--adapter", tmp_path / "janus-adapter", "--out", tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "trained on another base model" in err
