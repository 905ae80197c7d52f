"""Plain functions the test modules share (fixtures live in conftest.py): running the command in-process,
tiny models written in the real on-disk formats, a subject's reference pictures, a few-step training config
and a DreamBench-shaped dataset. A test module imports what it needs: `from helpers import subject_images`.

transformers and tokenizers are imported inside the functions that build models: almost every test module
imports this file (conftest.py too), and most of them never build one (collection stays fast). For the same
reason of reach, only toyworld and vq are imported at the top: a test of a low layer must not fail to collect
because a higher one (the recipe) is broken."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

from tokenbooth.toyworld import Scene, caption, pretraining_scene, render, reserved_instances
from tokenbooth.vq import VQGAN, VQGANConfig


def run_cli(capsys, *argv):
    """Runs `tokenbooth ARGV` in-process: (exit code, stdout, stderr)."""
    from tokenbooth.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a subject and a few steps of training ------------------------------------------------------------------

def subject_images(folder, size=16, n=4):
    """The first reserved toyworld subject on n backgrounds: a subject's reference pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    inst = reserved_instances()[0]
    for i, bg in enumerate(["white", "grass", "beach", "wood"][:n]):
        render(Scene(inst, bg, "center", "large", None, i), size).save(folder / f"ref{i}.png")
    return folder


# A few steps of the two-stage recipe (3 + 2), enough to see what each stage changes.
QUICK = dict(class_name="robot", stage1_steps=3, stage2_steps=2, stage1_lr=1e-2, stage2_lr=1e-3, batch_size=2,
             checkpointing_steps=100)


def quick(compute_dtype: str, **overrides) -> "TrainConfig":
    """QUICK with `overrides` on top. The compute dtype is named at every call because it decides what a test
    can compare: "model" computes in the weights' dtype (fp32 on the tiny models: exact, reproducible numbers),
    "bfloat16" is how mini's family trains (backbones/families.py), for the tests that check a run as mini
    runs it."""
    from tokenbooth.personalize import TrainConfig  # see the module docstring: the recipe is a higher layer

    return TrainConfig(**{**QUICK, "compute_dtype": compute_dtype, **overrides})


# --- tiny models in the real formats ------------------------------------------------------------------------

def build_tiny_model_folder(folder, seed: int = 0, context: int = 160):
    """A tiny random-weight Chameleon backbone saved as mini is (mini's family), so tests go through the same
    loading and sampling code as mini and Lumina-mGPT, in seconds."""
    from transformers import ChameleonForConditionalGeneration

    from tokenbooth.backbones.chameleon import ChameleonBackbone, ChameleonSpec, save_chameleon
    from tokenbooth.backbones.chameleon_build import chameleon_config, train_bpe_tokenizer

    torch.manual_seed(seed)
    vq_cfg = VQGANConfig(embed_dim=16, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
    rng = random.Random(seed)
    tokenizer = train_bpe_tokenizer([caption(pretraining_scene(i), rng) for i in range(300)], vq_cfg.n_embed, 40)
    config = chameleon_config(tokenizer.get_vocab(), n_codes=vq_cfg.n_embed, hidden=64, layers=2, heads=4, context=context)
    backbone = ChameleonBackbone("tiny", ChameleonForConditionalGeneration(config).eval(), tokenizer,
                                 VQGAN(vq_cfg).eval(), ChameleonSpec(resolution=16, size_unit=4, family="mini"))
    save_chameleon(backbone, folder)
    return folder


LUMINA_RES = 64  # a multiple of Lumina-mGPT's 32-pixel size unit; with 16x downsampling a 4 x 4 grid
VQ_CFG = VQGANConfig(embed_dim=8, n_embed=64, z_channels=32, ch=32, ch_mult=(1, 1, 1, 1, 1), num_res_blocks=1,
                     attn_resolutions=(4,), resolution=LUMINA_RES)
CAPTIONS = ["a photo of a red robot on the beach", "a cup on the grass", "a dog in the snow", "a rendition of a toy"]


def byte_bpe(texts, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 256 + 60, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts * 10, trainer)
    return tok


# Meta's VQGAN as released: a taming vqgan.yaml and a Lightning vqgan.ckpt.
VQGAN_YAML = """model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {embed_dim}
    n_embed: {n_embed}
    ddconfig:
      double_z: false
      z_channels: {z_channels}
      resolution: {resolution}
      in_channels: 3
      out_ch: 3
      ch: {ch}
      ch_mult: [{ch_mult}]
      num_res_blocks: {num_res_blocks}
      attn_resolutions: [4]
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_start: 0
        disc_weight: 0.8
"""


def write_meta_vqgan(folder, cfg=VQ_CFG, extra=None, seed=0):
    """vqgan.yaml + a Lightning vqgan.ckpt: state_dict with the loss networks, training state beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = dict(VQGAN(cfg).state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    ckpt = {"epoch": 4, "global_step": 1000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}], "lr_schedulers": [],
            "callbacks": {}, **(extra or {})}
    torch.save(ckpt, folder / "vqgan.ckpt")
    fields = {**cfg.__dict__, "ch_mult": ", ".join(map(str, cfg.ch_mult))}
    (folder / "vqgan.yaml").write_text(VQGAN_YAML.format(**fields))
    return folder


JANUS_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
                  "<begin_of_image>", "<end_of_image>"]
JANUS_RES = 16  # the vision tower's image_size; the VQ model downsamples 2x here: an 8 x 8 grid


def write_janus_folder(folder, seed=0, peaked=False, dtype=torch.bfloat16, spare_rows=24):
    """What deepseek-community/Janus-Pro-1B holds, in miniature: more embedding rows than tokenizer entries."""
    from tokenizers import AddedToken
    from transformers import JanusConfig, JanusForConditionalGeneration

    tok = byte_bpe([f"<|User|>: {c}\n\n<|Assistant|>:" for c in CAPTIONS], [])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in JANUS_SPECIALS])
    ids = {s: tok.token_to_id(s) for s in JANUS_SPECIALS}
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=tok.get_vocab_size() + spare_rows, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=ids[JANUS_SPECIALS[0]],
                         eos_token_id=ids[JANUS_SPECIALS[1]], pad_token_id=ids[JANUS_SPECIALS[2]]),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=JANUS_RES,
                           patch_size=2, projection_dim=64, num_image_tokens=64, mlp_ratio=2.0),
        vq_config=dict(embed_dim=4, num_embeddings=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                       latent_channels=32, projection_dim=64, image_token_embed_dim=64, num_patches=8),
        image_token_id=ids["<image_placeholder>"])
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    if peaked:  # random weights give near-uniform image logits; scaled ones make greedy decoding meaningful
        with torch.no_grad():
            model.model.generation_embeddings.weight.mul_(30)
            model.model.generation_head.vision_head.weight.mul_(30)
    model.to(dtype).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps(  # as transformers' Janus conversion writes it
        {"guidance_scale": 5, "temperature": 1, "pad_token_id": ids["<｜▁pad▁｜>"],
         "boi_token_id": ids["<begin_of_image>"], "bos_token_id": ids[JANUS_SPECIALS[0]]}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": JANUS_SPECIALS[0], "eos_token": JANUS_SPECIALS[1], "pad_token": JANUS_SPECIALS[2]}))
    return folder


# --- a DreamBench-shaped dataset ----------------------------------------------------------------------------

def toy_images(n: int, instance: int = 0, size: int = 40) -> list[Image.Image]:
    inst = reserved_instances()[instance]
    return [render(Scene(inst, bg, "center", "large", None, i), size)
            for i, bg in enumerate(["white", "grass", "beach", "wood", "snow"][:n])]


PROMPTS_AND_CLASSES = """Classes

subject_name,class
red_robot,robot
teddy,teddy
cat2,cat

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def make_dreambench(folder: Path) -> Path:
    """DreamBench's layout in small: a folder of JPEGs per subject and prompts_and_classes.txt."""
    folder.mkdir(parents=True)
    (folder / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES)
    for instance, name in enumerate(["red_robot", "teddy", "cat2"]):
        (folder / name).mkdir()
        for i, im in enumerate(toy_images(3, instance=instance, size=48)):
            im.crop((0, 0, 48, 40)).save(folder / name / f"{i:02d}.jpg")  # not square, like the real photos
    return folder


# Emu3 (BAAI/Emu3-Gen-hf) in miniature: the specials in the real order (convert_emu3_weights_to_hf.py), a VQ-VAE
# with the real four levels (8 pixels a latent, what Emu3Processor assumes) and 64 codes.
EMU3_RES = 32  # 4 x 4 latents
EMU3_CODES = 64


def write_emu3_folder(folder, seed=0, dtype=torch.float32, peaked=False):
    """What transformers' Emu3 conversion writes (model + processor + tokenizer, save_pretrained), tiny."""
    from tokenizers import AddedToken
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                              PreTrainedTokenizerFast)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *[f"<|extra_{i}|>" for i in range(205)],
                "<|image token|>", "<|image start|>", "<|image end|>",
                *[f"<|visual token {c:06d}|>" for c in range(EMU3_CODES)]]
    tok = byte_bpe(CAPTIONS + ["0123456789*"], [])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|extra_203|>", eos_token="<|extra_204|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|extra_0|>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
                              "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"})
    vocab = tok.get_vocab()
    config = Emu3Config(
        text_config=dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|extra_203|>"],
                         eos_token_id=vocab["<|extra_204|>"]),
        vq_config=dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32),
        vocabulary_map=vocab)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config)
    if peaked:  # random weights give near-uniform image logits; scaled ones make greedy decoding meaningful
        with torch.no_grad():
            model.lm_head.weight.mul_(30)
    model.to(dtype).save_pretrained(folder)
    processor = Emu3Processor(Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=EMU3_RES ** 2,
                                                 max_pixels=4 * EMU3_RES ** 2), tokenizer)
    processor.save_pretrained(folder)
    return folder


def cache_repo(cache, repo_id, source, skip=()):
    """A repository as `huggingface-cli download` leaves it: refs/main and snapshots/<commit>/ of links."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in skip:
            (snapshot / path.name).symlink_to(path)
