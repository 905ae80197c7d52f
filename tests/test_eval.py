"""Evaluation: the DreamBench metrics, their weight loaders (Hugging Face folders and the original release
files), `tokenbooth score`, and the DreamBench harness on a small DreamBench-shaped dataset built here.

The DINO and CLIP encoders are tiny random-weight models saved in every on-disk format the loaders read:
a Hugging Face folder, DINO's `dino_deitsmall16_pretrain.pth` state dict, and OpenAI's `ViT-B-32.pt`
TorchScript archive with its `bpe_simple_vocab_16e6.txt.gz` tokenizer beside it."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import EMU3_RES, PROMPTS_AND_CLASSES, make_dreambench, run_cli, toy_images, write_emu3_folder
from PIL import Image

from tokenbooth.errors import UserError
from tokenbooth.eval import metrics

# --- tiny encoders in the real formats ----------------------------------------------------------------

MERGES = ["t h", "th e</w>", "o n</w>", "i n</w>", "r o", "ro b"]  # a few BPE merges in OpenAI's file format


def write_openai_bpe(path: Path) -> None:
    path.write_bytes(gzip.compress(("\"bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(MERGES) + "\n").encode()))


def write_hf_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt as openai/clip-vit-base-patch32 ships them, written out independently of the
    code under test: bytes, bytes + '</w>', one entry per merge, then the two special tokens."""
    from tokenbooth.eval.convert import _bytes_to_unicode

    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def tiny_dino():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    config = ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                       image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True)
    return ViTModel(config, add_pooling_layer=False).eval()


def published(model) -> dict:
    """The tensors as save_pretrained writes them: the published checkpoints' names."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_file(str(Path(tmp) / "model.safetensors"))


def dino_original_state_dict(model) -> dict:
    """transformers' ViT -> the key names and fused qkv of DINO's vision_transformer.py."""
    s = published(model)
    out = {"cls_token": s["embeddings.cls_token"], "pos_embed": s["embeddings.position_embeddings"],
           "patch_embed.proj.weight": s["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": s["layernorm.weight"], "norm.bias": s["layernorm.bias"]}
    for i in range(model.config.num_hidden_layers):
        h = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            out[f"blocks.{i}.norm1.{p}"] = s[f"{h}layernorm_before.{p}"]
            out[f"blocks.{i}.norm2.{p}"] = s[f"{h}layernorm_after.{p}"]
            qkv = [s[f"{h}attention.attention.{x}.{p}"] for x in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(qkv)
            out[f"blocks.{i}.attn.proj.{p}"] = s[f"{h}attention.output.dense.{p}"]
            out[f"blocks.{i}.mlp.fc1.{p}"] = s[f"{h}intermediate.dense.{p}"]
            out[f"blocks.{i}.mlp.fc2.{p}"] = s[f"{h}output.dense.{p}"]
    return {k: v.clone() for k, v in out.items()}


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    vocab = 512 + len(MERGES) + 2
    torch.manual_seed(2)
    config = CLIPConfig(projection_dim=32,
                        vision_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=256, image_size=224, patch_size=32),
                        text_config=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=256, vocab_size=vocab, max_position_embeddings=77,
                                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # OpenAI ships fp16: both formats then hold exactly the same numbers
            p.copy_(p.half().float())
    return model


def clip_original_state_dict(model) -> dict:
    """transformers' CLIP -> OpenAI's clip/model.py names, fused in_proj, (in, out) projections, fp16 where
    OpenAI's convert_weights puts fp16, and the three size tensors the JIT archive carries."""
    s = published(model)
    v, t = "vision_model.", "text_model."
    out = {"visual.conv1.weight": s[f"{v}embeddings.patch_embedding.weight"].half(),
           "visual.class_embedding": s[f"{v}embeddings.class_embedding"],
           "visual.positional_embedding": s[f"{v}embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s[f"{v}pre_layrnorm.weight"], "visual.ln_pre.bias": s[f"{v}pre_layrnorm.bias"],
           "visual.ln_post.weight": s[f"{v}post_layernorm.weight"], "visual.ln_post.bias": s[f"{v}post_layernorm.bias"],
           "visual.proj": s["visual_projection.weight"].t().half(),
           "token_embedding.weight": s[f"{t}embeddings.token_embedding.weight"],
           "positional_embedding": s[f"{t}embeddings.position_embedding.weight"],
           "ln_final.weight": s[f"{t}final_layer_norm.weight"], "ln_final.bias": s[f"{t}final_layer_norm.bias"],
           "text_projection": s["text_projection.weight"].t().half(), "logit_scale": s["logit_scale"],
           "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
           "vocab_size": torch.tensor(model.config.text_config.vocab_size)}
    towers = ((f"{v}encoder.layers.", "visual.transformer.resblocks.", model.config.vision_config.num_hidden_layers),
              (f"{t}encoder.layers.", "transformer.resblocks.", model.config.text_config.num_hidden_layers))
    for src, dst, n in towers:
        for i in range(n):
            a, b = f"{src}{i}.", f"{dst}{i}."
            for p in ("weight", "bias"):
                out[f"{b}ln_1.{p}"] = s[f"{a}layer_norm1.{p}"]
                out[f"{b}ln_2.{p}"] = s[f"{a}layer_norm2.{p}"]
                out[f"{b}mlp.c_fc.{p}"] = s[f"{a}mlp.fc1.{p}"].half()
                out[f"{b}mlp.c_proj.{p}"] = s[f"{a}mlp.fc2.{p}"].half()
                out[f"{b}attn.out_proj.{p}"] = s[f"{a}self_attn.out_proj.{p}"].half()
            out[f"{b}attn.in_proj_weight"] = torch.cat([s[f"{a}self_attn.{x}_proj.weight"] for x in "qkv"]).half()
            out[f"{b}attn.in_proj_bias"] = torch.cat([s[f"{a}self_attn.{x}_proj.bias"] for x in "qkv"]).half()
    return {k: x.clone() for k, x in out.items()}


def save_torchscript_archive(state: dict, path: Path) -> None:
    """A TorchScript archive whose module tree carries `state` under its dotted names, as OpenAI's JIT
    checkpoints do."""
    class Node(torch.nn.Module):
        pass

    root = Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if not hasattr(module, name):
                module.add_module(name, Node())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; OpenAI's files are JIT archives
        torch.jit.script(root).save(str(path))


@pytest.fixture(scope="session")
def dino_and_clip(tmp_path_factory):
    """Paths of the tiny DINO and CLIP in each format the loaders read (not test_toybench's DINO and reader)."""
    root = tmp_path_factory.mktemp("encoders")
    dino = tiny_dino()
    dino.save_pretrained(root / "dino-hf")
    torch.save(dino_original_state_dict(dino), root / "dino_deitsmall16_pretrain.pth")
    clip = tiny_clip()
    clip.save_pretrained(root / "clip-hf")
    write_hf_tokenizer_files(root / "clip-hf")
    (root / "openai").mkdir()
    save_torchscript_archive(clip_original_state_dict(clip), root / "openai" / "ViT-B-32.pt")
    write_openai_bpe(root / "openai" / "bpe_simple_vocab_16e6.txt.gz")
    return {"dino-hf": root / "dino-hf", "dino-pth": root / "dino_deitsmall16_pretrain.pth",
            "clip-hf": root / "clip-hf", "clip-pt": root / "openai" / "ViT-B-32.pt"}


# --- preprocessing, placeholder, similarity math ----------------------------------------------------------

def test_preprocessing_resizes_the_short_side_and_crops_the_center_like_torchvision():
    wide = Image.new("RGB", (600, 300))
    assert metrics.resize_short_side(wide, 256).size == (512, 256)
    tall = Image.new("RGB", (333, 1000))
    assert metrics.resize_short_side(tall, 224).size == (224, int(224 * 1000 / 333))
    # CenterCrop rounds half-pixel offsets to even: left round(0.5) = 0, top round(1.5) = 2
    odd = Image.new("RGB", (225, 227))
    odd.putpixel((0, 2), (255, 0, 0))
    assert metrics.center_crop(odd, 224).getpixel((0, 0)) == (255, 0, 0)
    x = metrics.dino_pixels(Image.new("RGB", (500, 300), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], (1 - torch.tensor(metrics.IMAGENET_MEAN)) / torch.tensor(metrics.IMAGENET_STD))
    y = metrics.clip_pixels(Image.new("RGB", (300, 500), (0, 0, 0)))
    assert torch.allclose(y[:, 5, 5], -torch.tensor(metrics.CLIP_MEAN) / torch.tensor(metrics.CLIP_STD))


@pytest.mark.parametrize("prompt,expected", [
    ("a [V] dog on the beach", "a dog on the beach"),
    ("[V] dog", "dog"),
    ("a red [V]  cube shaped [V] toy", "a red cube shaped toy"),
    ("a dog", "a dog"),
])
def test_clip_t_text_has_the_placeholder_removed(prompt, expected):
    assert metrics.remove_placeholder(prompt, "[V]") == expected


class FixedEncoder:
    """Features chosen by the test: image i -> row i of a table."""

    def __init__(self, table):
        self.table = torch.nn.functional.normalize(torch.tensor(table, dtype=torch.float32), dim=-1)

    def embed_images(self, images):
        return self.table[list(images)]


def test_identical_images_score_one_and_the_paper_averages_refs_then_images():
    enc = FixedEncoder([[1, 0], [0, 1], [1, 1]])
    s = metrics.Scorer(enc, None).score(images=[0, 2], references=[0, 1])
    # image 0 vs refs (1, 0): 1.0 and 0.0 -> 0.5; image 2 vs refs: 0.707 each
    assert s["images"][0]["dino"] == pytest.approx(0.5)
    assert s["images"][1]["dino"] == pytest.approx(2 ** -0.5)
    assert s["real"][0]["dino"] == pytest.approx(0.0)  # each reference against the others, never itself
    same = metrics.Scorer(enc, None).score(images=[2, 2], references=[2, 2, 2])
    assert all(r["dino"] == pytest.approx(1.0) for r in same["images"] + same["real"])


def test_aggregation_paper_averages_subjects_and_all_pairs_pools_every_pair():
    a = {"references": 2, "images": [{"dino": 1.0}, {"dino": 0.0}], "real": [{"dino": 0.5}, {"dino": 0.5}]}
    b = {"references": 6, "images": [{"dino": 0.2}], "real": [{"dino": 0.9}] * 6}
    paper = metrics.aggregate([a, b], "paper")
    assert paper["dino"] == pytest.approx((0.5 + 0.2) / 2)  # subject a: 0.5, subject b: 0.2
    assert paper["real_dino"] == pytest.approx((0.5 + 0.9) / 2)
    pooled = metrics.aggregate([a, b], "all-pairs")
    assert pooled["dino"] == pytest.approx((2 * 1.0 + 2 * 0.0 + 6 * 0.2) / (2 + 2 + 6))
    assert pooled["real_dino"] == pytest.approx((2 * 1 * 0.5 + 6 * 5 * 0.9) / (2 * 1 + 6 * 5))
    assert paper["clip_i"] is None and paper["clip_t"] is None


# --- loaders ----------------------------------------------------------------------------------------------

def test_dino_from_a_hf_folder_and_from_the_original_pth_give_the_same_features(dino_and_clip):
    images = toy_images(3)
    a = metrics.load_dino(str(dino_and_clip["dino-hf"])).embed_images(images)
    b = metrics.load_dino(str(dino_and_clip["dino-pth"])).embed_images(images)
    assert a.shape == (3, 128) and torch.allclose(a, b, atol=1e-5)


def test_clip_from_a_hf_folder_and_from_openais_jit_archive_give_the_same_features(dino_and_clip):
    images, texts = toy_images(2), ["a robot on the beach", "the teddy in the snow"]
    hf, jit = metrics.load_clip(str(dino_and_clip["clip-hf"])), metrics.load_clip(str(dino_and_clip["clip-pt"]))
    assert torch.allclose(hf.embed_images(images), jit.embed_images(images), atol=1e-4)
    assert hf.tokenizer(texts)["input_ids"] == jit.tokenizer(texts)["input_ids"]
    assert torch.allclose(hf.embed_texts(texts), jit.embed_texts(texts), atol=1e-4)


def test_a_hub_id_loads_from_the_hugging_face_cache_without_the_network(dino_and_clip, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-dino" / "snapshots" / "0123abcd"
    shutil.copytree(dino_and_clip["dino-hf"], snapshot)
    (tmp_path / "hub" / "models--someone--tiny-dino" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-dino" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    images = toy_images(2)
    cached = metrics.load_dino("someone/tiny-dino").embed_images(images)
    assert torch.allclose(cached, metrics.load_dino(str(dino_and_clip["dino-hf"])).embed_images(images))


@pytest.mark.parametrize("flag,value,message", [
    ("dino", "clip-hf", "holds a clip model"),
    ("clip", "dino-hf", "holds a vit model"),
    ("dino", "clip-pt", "does not hold DINO ViT weights"),
    ("clip", "dino-pth", "does not hold OpenAI CLIP"),
])
def test_weights_of_the_wrong_architecture_are_refused(dino_and_clip, flag, value, message):
    load = metrics.load_dino if flag == "dino" else metrics.load_clip
    with pytest.raises(UserError, match=message):
        load(str(dino_and_clip[value]))


def test_missing_weights_say_what_to_download_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(metrics, "DINO_HUB_ID", "nobody/no-dino-here")  # the default, looked up in the cache only
    with pytest.raises(UserError, match=r"not in the Hugging Face cache.*hf download nobody/no-dino-here .*"
                                        r"dino_deitsmall16_pretrain\.pth"):
        metrics.load_dino(None)
    with pytest.raises(UserError, match=r"weights/dino\.pth not found\. Download DINO ViT-S/16"):
        metrics.load_dino("weights/dino.pth")
    refs = tmp_path / "refs"
    refs.mkdir()
    toy_images(1)[0].save(refs / "a.png")
    code, _, err = run_cli(capsys, "score", "--images", refs, "--references", refs, "--clip", "nobody/no-clip-here",
                           "--metrics", "clip-i")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "CLIP weights not found" in err and "ViT-B-32.pt" in err and "bpe_simple_vocab_16e6.txt.gz" in err


def test_an_archive_that_would_run_code_is_refused(tmp_path):
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "ViT-B-32.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Evil(), protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps(()))
    with pytest.raises(UserError, match="refusing to load"):
        metrics.load_clip(str(path))


def test_score_any_folder_against_references(dino_and_clip, tmp_path, capsys):
    gen, refs = tmp_path / "gen", tmp_path / "refs"
    gen.mkdir(), refs.mkdir()
    for i, im in enumerate(toy_images(3, instance=0)):
        im.save(refs / f"{i}.jpg")
    for i, im in enumerate(toy_images(2, instance=1)):
        im.save(gen / f"{i}.png")
    out = tmp_path / "scores.json"
    code, stdout, err = run_cli(capsys, "score", "--images", gen, "--references", refs, "--prompt", "a [V] robot",
                                "--dino", dino_and_clip["dino-pth"], "--clip", dino_and_clip["clip-hf"],
                                "--output", out)
    assert code == 0, err
    saved = json.loads(out.read_text())
    assert [r["file"] for r in saved["images"]] == ["0.png", "1.png"]
    assert all(r["clip_t_text"] == "a robot" and -1 <= r["dino"] <= 1 for r in saved["images"])
    assert len(saved["real"]) == 3 and "real images" in stdout


def test_score_on_generates_output_scores_the_images_it_drew_not_the_grid(dino_and_clip, tmp_path, capsys):
    from tokenbooth.images import make_grid

    gen, refs = tmp_path / "gen", tmp_path / "refs"
    gen.mkdir(), refs.mkdir()
    for i, im in enumerate(toy_images(2, instance=0)):
        im.save(refs / f"{i}.png")
    drawn = toy_images(2, instance=1)
    for i, im in enumerate(drawn):
        im.save(gen / f"image-{i:03d}.png")
    make_grid(drawn).save(gen / "grid.png")
    (gen / "generate.json").write_text(json.dumps({"prompt": "a [V] robot", "images": ["image-000.png",
                                                                                        "image-001.png"]}))
    (tmp_path / "prompts.txt").write_text("a [V] robot\na [V] robot on the grass\n")  # one line per drawn image
    out = tmp_path / "scores.json"
    code, _, err = run_cli(capsys, "score", "--images", gen, "--references", refs, "--prompts", tmp_path / "prompts.txt",
                           "--dino", dino_and_clip["dino-pth"], "--clip", dino_and_clip["clip-hf"], "--output", out)
    assert code == 0, err
    assert [r["file"] for r in json.loads(out.read_text())["images"]] == ["image-000.png", "image-001.png"]


def test_an_unwritable_score_output_is_refused_before_any_encoder_loads(tmp_path, capsys):
    gen = tmp_path / "gen"
    gen.mkdir()
    toy_images(1)[0].save(gen / "0.png")
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, "score", "--images", gen, "--references", gen, "--prompt", "a robot",
                           "--dino", tmp_path / "no-dino", "--output", blocker / "scores.json")
    assert code == 1 and "cannot create --output file" in err  # not the missing --dino, found only later


# --- DreamBench ---------------------------------------------------------------------------------------------

def test_prompts_and_classes_is_read_as_google_wrote_it(tmp_path):
    from tokenbooth.eval.dreambench import read_dreambench

    bench = read_dreambench(make_dreambench(tmp_path / "dataset"))
    assert [(s.name, s.class_name, s.live) for s in bench.subjects] == \
        [("red_robot", "robot", False), ("teddy", "teddy", False), ("cat2", "cat", True)]
    assert bench.prompts(bench.subjects[0], "[V]") == ["a [V] robot in the jungle", "a red [V] robot"]
    assert bench.prompts(bench.subjects[2], "[V]")[1] == "a [V] cat wearing a red hat"
    assert len(bench.subjects[1].images) == 3


def _break(dataset: Path, how: str) -> None:
    if how == "no prompts file":
        (dataset / "prompts_and_classes.txt").unlink()
    elif how == "no subject folder":
        for f in (dataset / "teddy").iterdir():
            f.unlink()
        (dataset / "teddy").rmdir()
    elif how == "no images":
        for f in (dataset / "teddy").iterdir():
            f.unlink()
    elif how == "unreadable image":
        (dataset / "teddy" / "01.jpg").write_bytes(b"not a jpeg")
    elif how == "no live prompts":
        text = PROMPTS_AND_CLASSES.split("Live Subject Prompts")[0]
        (dataset / "prompts_and_classes.txt").write_text(text)
    elif how == "bad class line":
        (dataset / "prompts_and_classes.txt").write_text(PROMPTS_AND_CLASSES.replace("teddy,teddy", "teddy teddy"))


@pytest.mark.parametrize("how,message", [
    ("no prompts file", "prompts_and_classes.txt is missing"),
    ("no subject folder", "subject teddy (listed in prompts_and_classes.txt) has no folder"),
    ("no images", "no images in subject teddy's folder"),
    ("unreadable image", "cannot read image"),
    ("no live prompts", "no 'Live Subject Prompts' section"),
    ("bad class line", "expected 'subject_name,class'"),
])
def test_a_dataset_in_the_wrong_layout_stops_with_one_line(tmp_path, capsys, how, message):
    dataset = make_dreambench(tmp_path / "dataset")
    _break(dataset, how)
    code, _, err = run_cli(capsys, "eval", "dreambench", "--data", dataset, "--output", tmp_path / "out")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_dreambench_list_shows_subjects_classes_images_and_prompts_without_loading_a_model(tmp_path, capsys,
                                                                                           monkeypatch):
    import tokenbooth.backbones as backbones
    import tokenbooth.cli  # noqa: F401 (imported first: a module importing load_backbone now would keep the stand-in)

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("--list loaded a model"))
    dataset = make_dreambench(tmp_path / "dataset")
    code, stdout, err = run_cli(capsys, "eval", "dreambench", "--data", dataset, "--list", "--subjects", "teddy,cat2")
    assert code == 0, err
    assert "2 subject(s)" in stdout and "teddy: class teddy, 3 image(s)" in stdout and "cat2: class cat" in stdout
    assert "a [V] {class} in the jungle" in stdout and "a [V] {class} wearing a red hat" in stdout
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


def bench_args(dataset, model, dino_and_clip, out, *extra):
    return ["eval", "dreambench", "--data", dataset, "--model", model, "--dino", dino_and_clip["dino-pth"],
            "--clip", dino_and_clip["clip-pt"], "--output", out, "--stage1-steps", "1", "--stage2-steps", "1",
            "--batch-size", "1", *extra]


def test_dreambench_runs_subjects_writes_tables_and_skips_finished_ones(tiny_model_dir, dino_and_clip, tmp_path,
                                                                       capsys):
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    code, stdout, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out,
                                                    "--subjects", "red_robot,cat2", "--images-per-prompt", "2"))
    assert code == 0, err
    for name in ("red_robot", "cat2"):
        folder = out / "subjects" / name
        scores = json.loads((folder / "scores.json").read_text())
        assert len(scores["images"]) == 2 * 2 and len(list((folder / "images").iterdir())) == 4
        assert (folder / "grid.png").is_file() and (folder / "adapter" / "adapter_config.json").is_file()
    cat = json.loads((out / "subjects" / "cat2" / "scores.json").read_text())
    assert cat["images"][2]["prompt"] == "a [V] cat wearing a red hat"
    assert cat["images"][2]["clip_t_text"] == "a cat wearing a red hat"
    rows = (out / "per_subject.csv").read_text().splitlines()
    assert rows[0].startswith("subject,class,live") and len(rows) == 3
    overall = json.loads((out / "overall.json").read_text())
    assert overall["missing_subjects"] == ["teddy"] and overall["protocol"] == "paper"
    assert overall["rows"][0]["clip_t"] is None and all(overall["rows"][1][m] is not None for m in metrics.METRICS)
    assert (out / "overall.md").read_text().startswith("# DreamBench")

    stamp = (out / "subjects" / "red_robot" / "scores.json").stat().st_mtime_ns
    (out / "subjects" / "cat2" / "scores.json").unlink()  # cat2 interrupted after drawing, before scoring
    (out / "subjects" / "cat2" / "images" / "01-1.png").unlink()
    adapter_stamp = (out / "subjects" / "cat2" / "adapter" / "adapter_config.json").stat().st_mtime_ns
    code, stdout, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out,
                                                    "--images-per-prompt", "2"))
    assert code == 0, err
    assert "1 already finished, 2 to do" in stdout
    assert (out / "subjects" / "red_robot" / "scores.json").stat().st_mtime_ns == stamp
    assert (out / "subjects" / "cat2" / "adapter" / "adapter_config.json").stat().st_mtime_ns == adapter_stamp
    assert (out / "subjects" / "cat2" / "images" / "01-1.png").is_file()
    assert json.loads((out / "overall.json").read_text())["missing_subjects"] == []

    code, _, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out))  # 1 image per prompt now
    assert code == 1 and "other settings (images_per_prompt: 2 there, 1 now)" in err


def test_dreambench_quantize_trains_qlora_and_draws_on_the_quantized_base(tiny_model_dir, dino_and_clip, tmp_path,
                                                                          capsys, monkeypatch):
    import tokenbooth.eval.dreambench as dreambench
    from tokenbooth.backbones.quantize import is_quantized

    real, drawn_on = dreambench.load_for_sampling, []

    def load_and_look(*args, **kwargs):
        backbone, bits = real(*args, **kwargs)
        k_proj = backbone.decoder_layers()[0].self_attn.k_proj  # LoRA's target: kept unmerged over the quantized one
        drawn_on.append((bits, is_quantized(getattr(k_proj, "base", k_proj).weight)))
        return backbone, bits

    monkeypatch.setattr(dreambench, "load_for_sampling", load_and_look)
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    code, _, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out, "--subjects", "cat2",
                                               "--quantize", "int8"))
    assert code == 0, err
    folder = out / "subjects" / "cat2"
    adapter = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert adapter["quantize"] == "int8" and adapter["layers"] == "lora"
    assert drawn_on == [("int8", True)]  # drawn on the quantized base it trained on
    assert json.loads((folder / "scores.json").read_text())["images"]
    code, _, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out, "--subjects", "cat2"))
    assert code == 1 and "quantize: 'int8' there" in err  # a restart must keep the run's settings


def test_dreambench_and_score_run_on_emu3(dino_and_clip, tmp_path, capsys):
    """The third family through the benchmark: personalized, drawn with its own guidance and negative prompt,
    scored; then `score` on what `generate` drew."""
    emu3 = write_emu3_folder(tmp_path / "tiny-emu3")
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    code, _, err = run_cli(capsys, *bench_args(dataset, emu3, dino_and_clip, out, "--subjects", "cat2",
                                               "--resolution", str(EMU3_RES)))
    assert code == 0, err
    scores = json.loads((out / "subjects" / "cat2" / "scores.json").read_text())
    assert scores["images"] and all(-1 <= row["dino"] <= 1 for row in scores["images"])
    assert json.loads((out / "overall.json").read_text())["rows"]
    drawn = tmp_path / "drawn"
    adapter = out / "subjects" / "cat2" / "adapter"
    code, _, err = run_cli(capsys, "generate", "--model", str(emu3), "--adapter", str(adapter),
                           "a [V] cat on the beach", "--out", str(drawn), "--seed", "0", "--resolution", str(EMU3_RES))
    assert code == 0, err
    code, _, err = run_cli(capsys, "score", "--images", str(drawn), "--references", str(dataset / "cat2"),
                           "--dino", dino_and_clip["dino-pth"], "--clip", dino_and_clip["clip-pt"])
    assert code == 0, err


def test_an_interrupted_run_keeps_finished_subjects_and_exits_non_zero(tiny_model_dir, dino_and_clip, tmp_path, capsys,
                                                                       monkeypatch):
    import tokenbooth.eval.dreambench as dreambench

    real_run_subject, calls = dreambench.run_subject, []

    def interrupted_on_the_second(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run_subject(*args, **kwargs)

    monkeypatch.setattr(dreambench, "run_subject", interrupted_on_the_second)
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    code, _, err = run_cli(capsys, *bench_args(dataset, tiny_model_dir, dino_and_clip, out))
    assert code == 130 and "interrupted" in err
    assert json.loads((out / "subjects" / "red_robot" / "scores.json").read_text())["subject"] == "red_robot"
    assert not (out / "subjects" / "teddy" / "scores.json").exists() and not (out / "overall.json").exists()
    assert not list(out.rglob("*.tmp"))


def test_accelerate_launch_shares_subjects_between_two_processes(tiny_model_dir, dino_and_clip, tmp_path):
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --multi_gpu is accelerate's torchrun launcher; with no GPU the processes share the work over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(port), "-m", "tokenbooth.eval"]
    args = [str(a) for a in bench_args(dataset, tiny_model_dir, dino_and_clip, out)[1:]]
    result = subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    done_by = {name: json.loads((out / "subjects" / name / "scores.json").read_text())["process_index"]
               for name in ("red_robot", "teddy", "cat2")}
    assert done_by == {"red_robot": 0, "teddy": 1, "cat2": 0}  # every 2nd subject, starting at the process index
    for name in done_by:  # trained exactly once: 1 + 1 steps in the log, not twice that
        log = (out / "subjects" / name / "adapter" / "log.jsonl").read_text().splitlines()
        assert len(log) == 2
    assert result.stdout.count("tables written to") == 1
    assert len((out / "per_subject.csv").read_text().splitlines()) == 4


# --- DreamBench's numbers, recomputed outside tokenbooth's metric code ------------------------------------

def by_hand_pixels(image: Image.Image, resize: int, crop: int, mean, std) -> torch.Tensor:
    """torchvision's Resize(resize, BICUBIC) + CenterCrop(crop) + ToTensor + Normalize, written out again."""
    import numpy as np

    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.convert("RGB").resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    x = torch.from_numpy(np.array(image.crop((left, top, left + crop, top + crop)))).permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class ByHand:
    """DINO's CLS feature and CLIP's projected features from the transformers models themselves."""

    def __init__(self, dino_and_clip):
        from transformers import CLIPModel, CLIPTokenizer, ViTModel

        self.dino = ViTModel.from_pretrained(dino_and_clip["dino-hf"], add_pooling_layer=False).eval()
        self.clip = CLIPModel.from_pretrained(dino_and_clip["clip-hf"]).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(dino_and_clip["clip-hf"])

    @torch.no_grad()
    def features(self, paths) -> dict[str, torch.Tensor]:
        images = [Image.open(p).convert("RGB") for p in paths]
        dino = torch.stack([by_hand_pixels(im, 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
                            for im in images])
        clip = torch.stack([by_hand_pixels(im, 224, 224, (0.48145466, 0.4578275, 0.40821073),
                                           (0.26862954, 0.26130258, 0.27577711)) for im in images])
        d = self.dino(pixel_values=dino).last_hidden_state[:, 0]
        c = self.clip.visual_projection(self.clip.vision_model(pixel_values=clip).pooler_output)
        return {"dino": torch.nn.functional.normalize(d, dim=-1), "clip_i": torch.nn.functional.normalize(c, dim=-1)}

    @torch.no_grad()
    def text_features(self, texts) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        t = self.clip.text_projection(self.clip.text_model(**tokens).pooler_output)
        return torch.nn.functional.normalize(t, dim=-1)


def by_hand_scores(by_hand: ByHand, out: Path, dataset: Path, name: str) -> dict:
    """One subject's similarity matrices: generated x references, references x references, CLIP-T per image."""
    scores = json.loads((out / "subjects" / name / "scores.json").read_text())
    generated = [out / "subjects" / name / row["file"] for row in scores["images"]]
    references = sorted((dataset / name).glob("*.jpg"))
    gen, ref = by_hand.features(generated), by_hand.features(references)
    texts = [" ".join(row["prompt"].replace("[V]", " ").split()) for row in scores["images"]]
    clip_t = (gen["clip_i"] * by_hand.text_features(texts)).sum(-1)
    return {"pairs": {m: gen[m] @ ref[m].T for m in ("dino", "clip_i")},
            "real": {m: ref[m] @ ref[m].T for m in ("dino", "clip_i")}, "clip_t": clip_t}


def by_hand_overall(subjects: list[dict], protocol: str) -> dict:
    out = {}
    for m in ("dino", "clip_i"):
        pairs = [s["pairs"][m] for s in subjects]
        others = [s["real"][m][~torch.eye(len(s["real"][m]), dtype=torch.bool)] for s in subjects]
        if protocol == "paper":  # per image over references, per subject over images, then over subjects
            out[m] = torch.stack([p.mean(1).mean() for p in pairs]).mean().item()
            out["real_" + m] = torch.stack([o.mean() for o in others]).mean().item()
        else:  # every pair of the benchmark at once
            out[m] = torch.cat([p.flatten() for p in pairs]).mean().item()
            out["real_" + m] = torch.cat(others).mean().item()
    per_subject = [s["clip_t"].mean() for s in subjects]
    pooled = torch.cat([s["clip_t"] for s in subjects])
    out["clip_t"] = (torch.stack(per_subject).mean() if protocol == "paper" else pooled.mean()).item()
    return out


def test_dreambench_numbers_match_a_computation_by_hand_under_both_protocols(tiny_model_dir, dino_and_clip, tmp_path,
                                                                            capsys):
    dataset, out = make_dreambench(tmp_path / "dataset"), tmp_path / "run"
    (dataset / "cat2" / "02.jpg").unlink()  # 2 references against 3: the protocols weigh subjects differently
    args = ["eval", "dreambench", "--data", dataset, "--model", tiny_model_dir, "--dino", dino_and_clip["dino-hf"],
            "--clip", dino_and_clip["clip-hf"], "--output", out, "--stage1-steps", "1", "--stage2-steps", "1",
            "--batch-size", "1", "--subjects", "red_robot,cat2"]
    code, _, err = run_cli(capsys, *args, "--protocol", "all-pairs", "--images-per-prompt", "2")
    assert code == 0, err
    by_hand = ByHand(dino_and_clip)
    subjects = [by_hand_scores(by_hand, out, dataset, name) for name in ("red_robot", "cat2")]
    assert [s["pairs"]["dino"].shape for s in subjects] == [(4, 3), (4, 2)]

    def check(protocol):
        overall = json.loads((out / "overall.json").read_text())
        assert overall["protocol"] == protocol
        real, model = overall["rows"]
        expected = by_hand_overall(subjects, protocol)
        for m in ("dino", "clip_i"):
            assert model[m] == pytest.approx(expected[m], abs=1e-5), (protocol, m)
            assert real[m] == pytest.approx(expected["real_" + m], abs=1e-5), (protocol, "real", m)
        assert model["clip_t"] == pytest.approx(expected["clip_t"], abs=1e-5), protocol
        return expected

    pooled = check("all-pairs")
    code, _, err = run_cli(capsys, *args, "--protocol", "paper", "--images-per-prompt", "2")  # tables only
    assert code == 0, err
    paper = check("paper")
    assert abs(pooled["real_dino"] - paper["real_dino"]) > 1e-4  # the two protocols really differ here
    rows = {r["subject"]: r for r in json.loads((out / "per_subject.json").read_text())["rows"]}
    for name, s in zip(("red_robot", "cat2"), subjects):
        for m in ("dino", "clip_i"):
            assert rows[name][m] == pytest.approx(s["pairs"][m].mean().item(), abs=1e-5)
        assert rows[name]["clip_t"] == pytest.approx(s["clip_t"].mean().item(), abs=1e-5)


def test_a_run_started_before_a_setting_existed_continues_while_it_keeps_its_default(tmp_path):
    from tokenbooth.errors import UserError
    from tokenbooth.eval.run_file import RUN_FILE, check_run_settings

    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": {"model": "mini", "seed": 0}}))
    defaults = {"seed": 0, "quantize": "none"}
    check_run_settings(tmp_path, {"model": "mini", "seed": 0, "quantize": "none"}, "DreamBench", defaults=defaults)
    with pytest.raises(UserError, match="quantize: None there, 'nf4' now"):
        check_run_settings(tmp_path, {"model": "mini", "seed": 0, "quantize": "nf4"}, "DreamBench", defaults=defaults)
    with pytest.raises(UserError, match="quantize"):  # without defaults, a new key is a difference
        check_run_settings(tmp_path, {"model": "mini", "seed": 0, "quantize": "none"}, "DreamBench")
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": "garbled"}))
    with pytest.raises(UserError, match="other settings"):
        check_run_settings(tmp_path, {"model": "mini", "seed": 0}, "DreamBench", defaults=defaults)


def test_a_toybench_run_started_before_a_sampling_or_training_setting_existed_continues_at_its_default(tmp_path):
    import copy

    from tokenbooth.errors import UserError
    from tokenbooth.eval.run_file import RUN_FILE
    from tokenbooth.eval.toybench.run import check_settings

    now = {"model": "mini", "sampling": {"cfg_scale": 2.0, "sjd_proactive": 1},
           "train": {"embedding": {"stage1_steps": 100, "lora_rank": 4}}}
    old = copy.deepcopy(now)
    del old["sampling"]["sjd_proactive"], old["train"]["embedding"]["lora_rank"]  # fields of a later version
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": old}))
    check_settings(tmp_path, now, write=False)
    asked = copy.deepcopy(now)
    asked["sampling"]["sjd_proactive"] = 2
    with pytest.raises(UserError, match=r"sampling\.sjd_proactive: None there, 2 now"):
        check_settings(tmp_path, asked, write=False)
    asked = copy.deepcopy(now)
    asked["train"]["embedding"]["lora_rank"] = 8
    with pytest.raises(UserError, match=r"train\.embedding\.lora_rank"):
        check_settings(tmp_path, asked, write=False)
    asked = copy.deepcopy(now)
    asked["sampling"]["cfg_scale"] = 3.0  # a setting the run did record still has to match
    with pytest.raises(UserError, match=r"sampling\.cfg_scale: 2\.0 there, 3\.0 now"):
        check_settings(tmp_path, asked, write=False)
