"""Lumina-mGPT and Janus-Pro as published, proven on tiny random-weight models written in the real formats.

Nothing here is downloaded. The folders below are what the Hub repositories hold, shrunk:
- Lumina-mGPT (Alpha-VLLM/Lumina-mGPT-7B-*): a bf16 Chameleon checkpoint in two shards with an index, no VQ
  model weights, qk-norms stored per model-parallel shard, Lumina's extra config keys, and Chameleon's
  tokenizer files; Meta's VQGAN beside it as a taming vqgan.yaml and a Lightning vqgan.ckpt.
- Janus-Pro (deepseek-community/Janus-Pro-*): transformers' Janus checkpoint in bf16, tokenizer.json and
  the generation_config.json its conversion writes.
Each loads through the same code path as the real thing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket

import pytest
import torch
from helpers import (CAPTIONS, cache_repo, JANUS_RES, LUMINA_RES, VQ_CFG, byte_bpe, quick, run_cli, write_janus_folder,
                     write_meta_vqgan)
from PIL import Image
from safetensors.torch import load_file, save_file

from tokenbooth.backbones import load_backbone
from tokenbooth.errors import UserError
from tokenbooth.personalize import load_adapter, load_reference_images, train
from tokenbooth.sampling import SamplingConfig, sample_image_tokens
from tokenbooth.sampling.sampler import sample_image_body
from tokenbooth.vq import load_vqgan

# --- Meta's VQGAN as released --------------------------------------------------------------------------
# (written by helpers.write_meta_vqgan)

# Key names of taming's VQModel as Chameleon's vqgan.ckpt holds them (the reference readers in
# facebookresearch/chameleon and Lumina-mGPT's chameleon_vae_ori build exactly these modules).
REAL_KEYS = ["encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.downsample.conv.weight",
             "encoder.down.4.attn.0.q.weight", "encoder.mid.attn_1.proj_out.bias", "encoder.norm_out.weight",
             "quant_conv.weight", "quantize.embedding.weight", "post_quant_conv.bias", "decoder.conv_in.weight",
             "decoder.mid.block_2.conv2.weight", "decoder.up.1.upsample.conv.weight", "decoder.up.4.attn.1.k.weight",
             "decoder.up.0.block.1.conv1.weight", "decoder.conv_out.weight"]


@pytest.fixture(scope="module")
def meta_vqgan(tmp_path_factory):
    return write_meta_vqgan(tmp_path_factory.mktemp("chameleon-tokenizer"))


def test_the_checkpoint_uses_taming_key_names(meta_vqgan):
    state = torch.load(meta_vqgan / "vqgan.ckpt", weights_only=True)["state_dict"]
    assert set(REAL_KEYS) <= set(state)


def test_meta_vqgan_loads_with_encoder_and_decoder_and_converts_once(meta_vqgan, tmp_path, capsys):
    from tokenbooth.vq.taming import load_taming_vqgan

    vq = load_taming_vqgan(meta_vqgan / "vqgan.yaml", meta_vqgan / "vqgan.ckpt")
    stored = torch.load(meta_vqgan / "vqgan.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(vq.decoder.conv_out.weight, stored["decoder.conv_out.weight"])
    codes = vq.encode(torch.rand(2, 3, LUMINA_RES, LUMINA_RES) * 2 - 1)
    assert codes.shape == (2, 4, 4) and vq.decode(codes).shape == (2, 3, LUMINA_RES, LUMINA_RES)

    code, out, err = run_cli(capsys, "convert", "vqgan", "--config", meta_vqgan / "vqgan.yaml", "--ckpt",
                             meta_vqgan / "vqgan.ckpt", "--out", tmp_path / "vqgan")
    assert code == 0, err
    converted = load_vqgan(tmp_path / "vqgan")
    assert converted.config == vq.config
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), vq.state_dict().values()))


def test_a_checkpoint_that_pickled_objects_still_loads_without_running_them(tmp_path):
    from tokenbooth.vq.taming import read_lightning_state_dict

    folder = write_meta_vqgan(tmp_path / "t", extra={"hyper_parameters": argparse.Namespace(lr=1e-4),
                                                     "loops": Explodes()})
    state = read_lightning_state_dict(folder / "vqgan.ckpt")  # weights_only refuses; the fallback stubs them
    assert "quantize.embedding.weight" in state and not Explodes.ran


class Explodes:
    ran = False

    def __reduce__(self):
        return (Explodes.mark, ())

    @staticmethod
    def mark():
        Explodes.ran = True


@pytest.mark.parametrize("edit,message", [
    (lambda y: y.replace("ch_mult: [1, 1, 1, 1, 1]", "ch_mult: [1, 1, 2, 2, 4]"), "does not match"),
    (lambda y: y.replace("n_embed: 64", "n_embed: 8192"), r"quantize\.embedding\.weight is \[64, 8\] in the"),
    (lambda y: y.replace("num_res_blocks: 1", "num_res_blocks: 2"), "lacks"),
    (lambda y: y.replace("ddconfig", "ddconf"), "not a taming VQGAN config"),
])
def test_a_vqgan_config_that_does_not_match_its_weights_is_refused(meta_vqgan, tmp_path, edit, message):
    from tokenbooth.vq.taming import load_taming_vqgan

    yaml_path = tmp_path / "vqgan.yaml"
    yaml_path.write_text(edit((meta_vqgan / "vqgan.yaml").read_text()))
    with pytest.raises(UserError, match=message):
        load_taming_vqgan(yaml_path, meta_vqgan / "vqgan.ckpt")


# --- Lumina-mGPT as published ----------------------------------------------------------------------------

def chameleon_vocabulary_specials(n_codes):
    """Chameleon's id order: <s> <pad> </s> <unk>, the IMGIMG image tokens, then the tokens Lumina-mGPT's
    layout uses (<image> took <reserved08707>'s place in the HF conversion) and free reserved rows."""
    from tokenbooth.backbones.chameleon import image_token_name, size_token

    return (["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(n_codes)]
            + [f"<reserved0{n}>" for n in range(8192, 8196)]
            + ["<reserved08706>", "<image>", "<eoss>", "<racm3:break>", "<reserved08796>", "<reserved08797>",
               "<reserved08798>", "<reserved08799>"] + [size_token(n) for n in range(1, 33)])


def write_lumina_folder(folder, seed=0, hidden=64):
    """What Alpha-VLLM/Lumina-mGPT-7B-768 holds, in miniature."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    tok = byte_bpe([f"Generate an image of {LUMINA_RES}x{LUMINA_RES} according to the following prompt:\n{c}"
                    for c in CAPTIONS], chameleon_vocabulary_specials(VQ_CFG.n_embed))
    vocab = tok.get_vocab()
    config = ChameleonConfig(
        vocab_size=-(-len(vocab) // 64) * 64, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1,
        eos_token_id=2, vocabulary_map=vocab,
        vq_config=dict(embed_dim=8, num_embeddings=VQ_CFG.n_embed, latent_channels=32, base_channels=32,
                       channel_multiplier=[1], num_res_blocks=0, resolution=LUMINA_RES))
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    for shard in shards:  # Lumina-mGPT deletes the VQ model before saving, and keeps one qk-norm row per shard
        tensors = {k: v for k, v in load_file(str(folder / shard)).items() if ".vqmodel." not in k}
        for k in tensors:
            if ".q_norm." in k or ".k_norm." in k:
                tensors[k] = torch.randn(1, tensors[k].shape[1], dtype=torch.bfloat16)
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if ".vqmodel." not in k}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["ChameleonXLLMXForConditionalGeneration"], z_loss_weight=1e-5, mask_image_logits=False,
               dropout=0.05, model_parallel_size=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "sep_token": "<reserved08706>",
         "unk_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                              "eos_token": "</s>", "legacy": False}))
    return folder


@pytest.fixture(scope="module")
def lumina_dir(tmp_path_factory):
    return write_lumina_folder(tmp_path_factory.mktemp("published") / "tiny-lumina")


@pytest.fixture
def vqgan_env(meta_vqgan, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENBOOTH_VQGAN", str(meta_vqgan))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no VQGAN of the developer's own in the way


@pytest.fixture
def lumina(lumina_dir, vqgan_env):
    return load_backbone(str(lumina_dir), resolution=LUMINA_RES)


def test_lumina_checkpoint_loads_into_transformers_chameleon_in_bf16_with_sdpa(lumina, lumina_dir):
    model = lumina.model
    from tokenbooth.backbones.hf import CPU_FLOAT32_SDPA

    # SDPA, computed in float32 where the CPU would run it in bf16 (backbones/hf.float32_sdpa_on_cpu)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == CPU_FLOAT32_SDPA
    stored = {}
    for shard in set(json.loads((lumina_dir / "model.safetensors.index.json").read_text())["weight_map"].values()):
        stored.update(load_file(str(lumina_dir / shard)))
    q_norm = model.model.layers[1].self_attn.q_norm.weight  # one row per head, from the one row per shard
    assert q_norm.shape == (4, 16)
    assert torch.equal(q_norm, stored["model.layers.1.self_attn.q_norm.weight"].expand(4, -1))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, stored["model.layers.0.mlp.down_proj.weight"])
    assert lumina.family == "lumina-mgpt" and lumina.resolution == LUMINA_RES


def test_lumina_prompt_and_image_block_follow_lumina_mgpt(lumina):
    tok = lumina.tokenizer
    ids = lumina.prompt_ids("a cup on the grass")
    text = "Generate an image of 64x64 according to the following prompt:\na cup on the grass"
    assert ids == [tok.token_to_id("<s>"), *tok.encode(text, add_special_tokens=False).ids,
                   tok.token_to_id("<reserved08706>"), tok.token_to_id("<racm3:break>"),
                   tok.token_to_id("<reserved08802>"), tok.token_to_id("<reserved08802>")]
    assert lumina.unconditional_ids(ids) == ids[-3:]
    assert lumina.placeholder_candidates()[0] == "<reserved08192>"


def test_lumina_image_round_trip_and_generated_layout(lumina):
    codes = lumina.encode_images(torch.rand(2, 3, LUMINA_RES, LUMINA_RES) * 2 - 1)
    assert codes.shape == (2, 4, 4) and lumina.decode_images(codes).shape == (2, 3, LUMINA_RES, LUMINA_RES)
    tok = lumina.tokenizer
    body = sample_image_body(lumina, ["a red robot"], SamplingConfig.for_family("lumina-mgpt", seed=0))[0].tolist()
    image_ids = set(lumina.layout.image_token_ids.tolist())
    rows = [body[i * 5: i * 5 + 5] for i in range(4)]
    assert all(r[-1] == tok.token_to_id("<reserved08799>") and set(r[:-1]) <= image_ids for r in rows)
    assert body[20:] == [tok.token_to_id("<eoss>")]
    assert {tok.id_to_token(i)[:6] for i in image_ids} == {"IMGIMG"}


# --- personalization on both backbones --------------------------------------------------------------

def subject_folder(folder, size):
    folder.mkdir(parents=True, exist_ok=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (size, size), color).save(folder / f"{i}.png")
    return folder


def values(backbone):
    return {k: v.detach().float().clone() for k, v in backbone.model.named_parameters()}


def changed(before, backbone):
    after = dict(backbone.model.named_parameters())
    return {k for k in before if not torch.equal(before[k], after[k].detach().float())}


def is_llm_qkv(name):
    return name.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") and ".vision_model." not in name


def test_lumina_stages_change_only_the_placeholder_then_qkv_and_the_adapter_reloads(lumina, lumina_dir, tmp_path):
    refs = load_reference_images(subject_folder(tmp_path / "refs", LUMINA_RES), LUMINA_RES)
    before = values(lumina)
    out = train(lumina, refs, quick("model", stage1_steps=2, stages="embedding"), tmp_path / "s1", progress=False)
    assert changed(before, lumina) == set()
    assert load_file(str(out / "learned_embeds.safetensors"))["[V]"].dtype == torch.float32

    fresh = load_backbone(str(lumina_dir), resolution=LUMINA_RES)
    before = values(fresh)
    out = train(fresh, refs, quick("model", stage1_steps=2, gradient_checkpointing=True), tmp_path / "s2",
                progress=False)
    assert all(layer.gradient_checkpointing for layer in fresh.model.model.layers)
    assert not fresh.model.training  # back in eval mode: sampling after training keeps its KV cache
    moved = changed(before, fresh)
    assert moved and all(is_llm_qkv(k) for k in moved)
    layers = load_file(str(out / "layers.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in layers.values())

    reloaded = load_adapter(load_backbone(str(lumina_dir), resolution=LUMINA_RES), out)
    params = dict(reloaded.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in layers.items())
    row = reloaded.input_embeddings().weight[reloaded.tokenizer.token_to_id(reloaded.placeholder_token)]
    assert torch.equal(row, load_file(str(out / "learned_embeds.safetensors"))["[V]"].to(torch.bfloat16))


def test_lumina_train_then_generate_with_the_adapter_from_the_command_line(lumina_dir, vqgan_env, tmp_path, capsys):
    refs = subject_folder(tmp_path / "refs", LUMINA_RES)
    common = ["--model", lumina_dir, "--resolution", LUMINA_RES]
    code, _, err = run_cli(capsys, "train", *common, "--images", refs, "--class-name", "robot", "--output",
                           tmp_path / "adapter", "--stage1-steps", "1", "--stage2-steps", "1", "--batch-size", "2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", "a [V] robot in the snow", *common, "--adapter", tmp_path / "adapter",
                           "-n", "1", "--out", tmp_path / "gen")
    assert code == 0, err
    assert Image.open(tmp_path / "gen" / "image-000.png").size == (LUMINA_RES, LUMINA_RES)


# --- Janus-Pro as published ---------------------------------------------------------------------------
# (the folder: conftest's janus_dir, written by helpers.write_janus_folder in bf16 as the Hub's are)

@pytest.fixture
def janus(janus_dir):
    return load_backbone(str(janus_dir))


def test_janus_layout_prompt_and_cfg_row_follow_deepseek(janus):
    tok = janus.tokenizer
    layout = janus.layout
    assert layout.row_end is None and layout.rows == layout.cols == 8 and layout.body_length == 65
    assert layout.header == (tok.token_to_id("<begin_of_image>"),)
    assert layout.image_end == tok.token_to_id("<end_of_image>")
    assert int(layout.image_token_ids[0]) == janus.input_embeddings().num_embeddings  # after every text row
    ids = janus.prompt_ids("  a cup on the grass ")
    text = tok.encode("<|User|>: a cup on the grass\n\n<|Assistant|>:", add_special_tokens=False).ids
    assert ids == [tok.token_to_id("<｜begin▁of▁sentence｜>"), *text, tok.token_to_id("<begin_of_image>")]
    pad = tok.token_to_id("<｜▁pad▁｜>")
    assert janus.unconditional_ids(ids) == [ids[0], *[pad] * (len(ids) - 2), ids[-1]]
    assert janus.model.dtype == torch.bfloat16 and janus.model.model.vqmodel.dtype == torch.float32


def test_janus_placeholder_takes_the_first_row_no_token_uses_or_a_new_one(janus, tmp_path):
    table = janus.input_embeddings()
    v = janus.tokenizer.token_to_id(janus.placeholder_candidates()[0])
    assert v == janus.tokenizer.get_vocab_size() - 1 < table.num_embeddings - 1  # a spare row, as in Janus-Pro
    full = load_backbone(str(write_janus_folder(tmp_path / "full", spare_rows=0)))
    rows = full.model.config.text_config.vocab_size
    assert full.input_embeddings().num_embeddings == rows + 1  # the table grew by [V]'s row
    assert full.tokenizer.token_to_id(full.placeholder_candidates()[0]) == rows
    assert int(full.layout.image_token_ids[0]) == rows + 1


def test_janus_image_round_trip_and_generated_layout(janus):
    codes = janus.encode_images(torch.rand(2, 3, JANUS_RES, JANUS_RES) * 2 - 1)
    assert codes.shape == (2, 8, 8) and int(codes.max()) < 32
    assert janus.decode_images(codes).shape == (2, 3, JANUS_RES, JANUS_RES)
    body = sample_image_body(janus, ["a red robot", "a cup"], SamplingConfig(cfg_scale=4.0, image_top_k=2000, seed=0))
    image_ids = set(janus.layout.image_token_ids.tolist())
    assert set(body[:, :64].flatten().tolist()) <= image_ids
    assert body[:, 64].tolist() == [janus.tokenizer.token_to_id("<end_of_image>")] * 2


def test_janus_greedy_cfg_sampling_matches_transformers_janus_generate(tmp_path):
    from transformers import GenerationConfig

    folder = write_janus_folder(tmp_path / "peaked", peaked=True, dtype=torch.float32)
    janus = load_backbone(str(folder))
    ours = sample_image_tokens(janus, ["a red robot"], SamplingConfig.for_family("janus-pro", seed=0, image_top_k=1, cfg_scale=5.0))
    prompt = torch.tensor([janus.prompt_ids("a red robot")])
    theirs = janus.model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_mode="image",
                                  generation_config=GenerationConfig(
                                      do_sample=False, guidance_scale=5.0, pad_token_id=janus.pad,
                                      bos_token_id=janus.bos, generation_kwargs={"boi_token_id": janus.boi}))
    assert len(set(ours.flatten().tolist())) > 1
    assert torch.equal(ours.flatten(), theirs.flatten())


def test_janus_stages_and_lora_touch_only_the_language_model(janus_dir, tmp_path):
    refs = load_reference_images(subject_folder(tmp_path / "refs", JANUS_RES), JANUS_RES)
    janus = load_backbone(str(janus_dir))
    before = values(janus)
    train(janus, refs, quick("model", stage1_steps=2, stages="embedding"), tmp_path / "s1", progress=False)
    assert changed(before, janus) == set()

    janus = load_backbone(str(janus_dir))
    before = values(janus)
    train(janus, refs, quick("model", stage1_steps=2), tmp_path / "s2", progress=False)
    moved = changed(before, janus)
    assert moved and all(is_llm_qkv(k) for k in moved)

    janus = load_backbone(str(janus_dir))
    out = train(janus, refs, quick("model", stage1_steps=2, layers="lora", lora_rank=2), tmp_path / "lora",
                progress=False)
    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert lora and all(".language_model.layers." in k for k in lora)
    reloaded = load_adapter(load_backbone(str(janus_dir)), out)
    assert reloaded.placeholder_token == "<|tokenbooth_placeholder|>"


def test_janus_train_then_generate_with_the_adapter_from_the_command_line(janus_dir, tmp_path, capsys):
    refs = subject_folder(tmp_path / "refs", JANUS_RES)
    code, _, err = run_cli(capsys, "train", "--model", janus_dir, "--images", refs, "--class-name", "robot",
                           "--output", tmp_path / "adapter", "--stage1-steps", "1", "--stage2-steps", "1",
                           "--batch-size", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["stage1_lr"] == 0.01  # paper's
    code, _, err = run_cli(capsys, "generate", "a [V] robot on the beach", "--model", janus_dir, "--adapter",
                           tmp_path / "adapter", "-n", "1", "--out", tmp_path / "gen")
    assert code == 0, err


# --- names, the Hugging Face cache, and refusals ----------------------------------------------------------

@pytest.fixture
def offline_cache(lumina_dir, janus_dir, vqgan_env, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache_repo(cache, "Alpha-VLLM/Lumina-mGPT-7B-768", lumina_dir)
    cache_repo(cache, "Alpha-VLLM/Lumina-mGPT-7B-512", lumina_dir,  # the 512 repository has no tokenizer files
               skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    cache_repo(cache, "deepseek-community/Janus-Pro-1B", janus_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tokenbooth tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return cache


def test_published_names_load_from_the_hugging_face_cache_offline(offline_cache):
    lumina = load_backbone("lumina-mgpt-7b-768")
    assert lumina.resolution == 768 and lumina.layout.rows == 48  # the preset's resolution, 16x downsampling
    assert lumina.tokenizer.token_to_id("<reserved08824>") == lumina.layout.header[1]  # 768 / 32 = 24
    lumina512 = load_backbone("lumina-mgpt-7b-512")  # its tokenizer comes from the 768 repository, as Lumina's
    assert lumina512.resolution == 512
    assert lumina512.layout.header[1] == lumina512.tokenizer.token_to_id("<reserved08816>")
    janus = load_backbone("janus-pro-1b")
    assert janus.family == "janus-pro" and janus.resolution == JANUS_RES
    with pytest.raises(UserError, match="not in the Hugging Face cache.*Janus-Pro-7B"):
        load_backbone("janus-pro-7b")


def test_a_folder_named_after_its_repository_needs_no_resolution_flag(lumina_dir, vqgan_env, tmp_path):
    named = tmp_path / "Lumina-mGPT-7B-1024"
    shutil.copytree(lumina_dir, named)
    assert load_backbone(str(named)).resolution == 1024
    with pytest.raises(UserError, match="--resolution"):
        load_backbone(str(lumina_dir))


@pytest.mark.parametrize("remove,message", [
    ("tokenizer.json", "text tokenizer missing: .*tokenizer.json"),
    ("config.json", "model file missing: .*config.json"),
    ("model.safetensors.index.json", "model file missing: .*model.safetensors"),
])
def test_a_missing_file_is_one_line_naming_it(lumina_dir, vqgan_env, tmp_path, monkeypatch, capsys, remove, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    broken = tmp_path / "broken"
    shutil.copytree(lumina_dir, broken)
    (broken / remove).unlink()
    if remove.endswith("index.json"):
        for shard in broken.glob("model-*.safetensors"):
            shard.unlink()
    code, _, err = run_cli(capsys, "generate", "a cup", "--model", broken, "--resolution", LUMINA_RES, "--out",
                           tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_a_missing_vqgan_says_where_it_is_expected(lumina_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENBOOTH_VQGAN", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.raises(UserError, match=r"Chameleon VQGAN missing: put vqgan.yaml \+ vqgan.ckpt .*tiny-lumina/vqgan"):
        load_backbone(str(lumina_dir), resolution=LUMINA_RES)


def test_other_architectures_and_mismatched_weights_are_refused(lumina_dir, vqgan_env, tmp_path):
    other = tmp_path / "llama"
    shutil.copytree(lumina_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UserError, match="holds a 'llama' model"):
        load_backbone(str(other))

    wider = write_lumina_folder(tmp_path / "wider", hidden=96)
    shutil.copy(lumina_dir / "config.json", wider / "config.json")  # a config that does not describe the weights
    with pytest.raises(UserError, match="do not match its config.json: .* is \\[.*96"):
        load_backbone(str(wider), resolution=LUMINA_RES)
