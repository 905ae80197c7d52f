"""Every subcommand, fed bad values of its flags and bad files of every kind it reads: each gets one line on
stderr starting with "tokenbooth: error:", a non-zero exit, no traceback, and leaves no new file behind.

The CLI runs in-process (tokenbooth.cli.main) on the tiny model; the inputs are built once per module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import make_dreambench
from PIL import Image

from tokenbooth.cli import main

GOOD_PROMPT = "a [V] robot"


def files_under(*roots: Path) -> set[Path]:
    return {p for root in roots for p in root.rglob("*")}


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 200, 30)).save(folder / f"{i}.png")
    return folder


def _adapter_variants(good: Path, root: Path) -> dict[str, Path]:
    """Copies of a good adapter, each broken in one way."""
    def variant(name, edit):
        folder = root / f"adapter-{name}"
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    def config(folder, change):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(change(cfg)))

    def truncate(path):
        path.write_bytes(path.read_bytes()[:40])

    def wrong_shape(folder):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "learned_embeds.safetensors"))
        save_file({k: v[:-1].contiguous() for k, v in tensors.items()}, str(folder / "learned_embeds.safetensors"))

    return {
        "not-utf8": variant("not-utf8", lambda f: (f / "adapter_config.json").write_bytes(b"\xff\xfe{\x00")),
        "not-json": variant("not-json", lambda f: (f / "adapter_config.json").write_text("{oops")),
        "not-object": variant("not-object", lambda f: (f / "adapter_config.json").write_text("[1, 2]")),
        "missing-key": variant("missing-key", lambda f: config(f, lambda c: {k: v for k, v in c.items()
                                                                               if k != "placeholder_token"})),
        "wrong-type": variant("wrong-type", lambda f: config(f, lambda c: {**c, "placeholder_token_id": "7"})),
        "bad-sampling": variant("bad-sampling", lambda f: config(f, lambda c: {**c, "sampling": {"cfg_scale": -1}})),
        "other-key-name": variant("other-key-name", lambda f: config(f, lambda c: {**c, "placeholder": "<sks>"})),
        "truncated": variant("truncated", lambda f: truncate(f / "learned_embeds.safetensors")),
        "wrong-shape": variant("wrong-shape", wrong_shape),
    }


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    """Good and bad inputs of every kind the commands read."""
    from tokenbooth.backbones import load_backbone
    from tokenbooth.personalize import TrainConfig, load_reference_images, train

    root = tmp_path_factory.mktemp("inputs")
    refs = _images(root / "refs", 2)
    junk = root / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("a file, not a folder")
    adapter = root / "adapter"
    cfg = TrainConfig.for_family("mini", class_name="robot", stages="embedding", stage1_steps=1, batch_size=1)
    train(load_backbone(str(tiny_model_dir)), load_reference_images(refs, 16), cfg, adapter, progress=False)
    unfinished = root / "unfinished"
    train(load_backbone(str(tiny_model_dir)), load_reference_images(refs, 16),
          TrainConfig.for_family("mini", class_name="robot", stages="embedding", stage1_steps=2, batch_size=1,
                                 checkpointing_steps=1), unfinished, progress=False, stop_after=1)

    models = {}
    for name, edit in {
        "truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
        "config-not-object": lambda f: (f / "config.json").write_text("[]"),
        "config-not-json": lambda f: (f / "config.json").write_text("{"),
        "no-config": lambda f: (f / "config.json").unlink(),
    }.items():
        models[name] = root / f"model-{name}"
        shutil.copytree(tiny_model_dir, models[name])
        edit(models[name])

    prompts = root / "prompts"
    prompts.mkdir()
    (prompts / "three.txt").write_text("a\nb\nc\n")
    (prompts / "list.json").write_text('["a", "b"]')
    (prompts / "numbers.json").write_text('{"0.png": 1, "1.png": 2}')
    (prompts / "latin1.txt").write_bytes("caf\xe9\ncaf\xe9\n".encode("latin-1"))
    generated = {}
    for name, meta in {"sidecar-not-json": "{", "sidecar-lists-a-missing-image": json.dumps(
            {"prompt": "x", "images": ["0.png", "gone.png"]})}.items():
        generated[name] = _images(root / name, 2)
        (generated[name] / "generate.json").write_text(meta)

    dreambench = make_dreambench(root / "dreambench")
    (root / "bad.yaml").write_text("model: [unclosed")
    (root / "latin1.yaml").write_bytes(b"model: caf\xe9")
    (root / "good.yaml").write_text("model:\n  params:\n    embed_dim: 4\n    n_embed: 8\n    ddconfig:\n"
                                    "      z_channels: 4\n      ch: 32\n      ch_mult: [1]\n      num_res_blocks: 1\n"
                                    "      resolution: 8\n      attn_resolutions: []\n")
    (root / "truncated.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    return {"root": root, "model": str(tiny_model_dir), "refs": refs, "junk": junk, "empty": root / "empty",
            "file": root / "file.txt", "adapter": adapter, "unfinished": unfinished,
            "adapters": _adapter_variants(adapter, root), "models": models, "prompts": prompts,
            "generated": generated, "dreambench": dreambench}


# (case id, argv built from the inputs and a fresh output folder, what the line must mention)
def generate_cases():
    def g(*extra, prompt=GOOD_PROMPT, model=None):
        return lambda i, out: ["generate", prompt, "--model", model(i) if model else i["model"], "--out", out, *extra]

    adapter = lambda name: lambda i, out: ["generate", GOOD_PROMPT, "--model", i["model"], "--out", out,  # noqa: E731
                                           "--adapter", i["adapters"][name]]
    return [
        ("unknown model", g(model=lambda i: "no-such-model"), "unknown model"),
        ("model is a file", g(model=lambda i: str(i["file"])), "not a folder"),
        *[(f"model {name}", g(model=lambda i, n=name: str(i["models"][n])), "") for name in
          ("truncated", "config-not-object", "config-not-json", "no-config")],
        ("-n 0", g("-n", "0"), "-n"),
        ("-n not a number", g("-n", "two"), "-n"),
        ("--cfg inf", g("--cfg", "inf"), "--cfg"),
        ("--cfg nan", g("--cfg", "nan"), "--cfg"),
        ("--cfg negative", g("--cfg", "-1"), "--cfg"),
        ("--top-k 0", g("--top-k", "0"), "--top-k"),
        ("--top-p 0", g("--top-p", "0"), "--top-p"),
        ("--top-p nan", g("--top-p", "nan"), "--top-p"),
        ("--top-p above 1", g("--top-p", "1.5"), "--top-p"),
        ("--temperature 0", g("--temperature", "0"), "--temperature"),
        ("--temperature -inf", g("--temperature", "-inf"), "--temperature"),
        ("--seed not a number", g("--seed", "x"), "--seed"),
        ("--resolution 5", g("--resolution", "5"), "resolution"),
        ("--device bogus", g("--device", "bogus"), "--device"),
        ("--sampler bogus", g("--sampler", "greedy"), "--sampler"),
        ("--sjd-window 0", g("--sampler", "sjd", "--sjd-window", "0"), "--sjd-window"),
        ("--sjd-window past the image", g("--sampler", "sjd", "--sjd-window", "100000"), "--sjd-window"),
        ("--sjd-init bogus", g("--sampler", "sjd", "--sjd-init", "below"), "--sjd-init"),
        ("--sjd-window without sjd", g("--sjd-window", "4"), "--sampler sjd"),
        ("prompt too long", g(prompt="a red robot " * 200), "prompt too long"),
        ("unknown flag", g("--bogus"), "--bogus"),
        ("--out under a file", lambda i, out: ["generate", GOOD_PROMPT, "--model", i["model"], "--out",
                                               i["file"] / "out"], "not a folder"),
        ("adapter missing", lambda i, out: ["generate", GOOD_PROMPT, "--model", i["model"], "--out", out,
                                            "--adapter", i["root"] / "nowhere"], "not an adapter folder"),
        ("adapter is an image folder", lambda i, out: ["generate", GOOD_PROMPT, "--model", i["model"], "--out", out,
                                                       "--adapter", i["refs"]], "not an adapter folder"),
        ("adapter config not UTF-8", adapter("not-utf8"), "not UTF-8"),
        ("adapter config not JSON", adapter("not-json"), "not JSON"),
        ("adapter config not an object", adapter("not-object"), "JSON object"),
        ("adapter config lacks a key", adapter("missing-key"), "placeholder_token"),
        ("adapter config wrong type", adapter("wrong-type"), "placeholder_token_id"),
        ("adapter sampling out of range", adapter("bad-sampling"), "sampling"),
        ("adapter embedding under another name", adapter("other-key-name"), "learned_embeds"),
        ("adapter weights truncated", adapter("truncated"), "cannot read adapter weights"),
        ("adapter embedding of the wrong shape", adapter("wrong-shape"), "shape"),
    ]


def train_cases():
    def t(*extra, images=None):
        return lambda i, out: ["train", "--model", i["model"], "--images", images(i) if images else i["refs"],
                               "--output", out, *extra]

    named = lambda *extra: t("--class-name", "robot", *extra)  # noqa: E731
    return [
        ("images missing", t("--class-name", "robot", images=lambda i: i["root"] / "nowhere"), "not found"),
        ("images is a file", t("--class-name", "robot", images=lambda i: i["file"]), "not found"),
        ("images empty", t("--class-name", "robot", images=lambda i: i["empty"]), "no images"),
        ("images unreadable", t("--class-name", "robot", images=lambda i: i["junk"]), "no readable image"),
        ("no --images", lambda i, out: ["train", "--model", i["model"], "--class-name", "robot", "--output", out],
         "--images"),
        ("no class name", t(), "--class-name"),
        ("class name and none", named("--no-class-name"), "contradict"),
        ("class name blank", t("--class-name", "  "), "class name"),
        ("class name too long", t("--class-name", "robot " * 60), "too long"),
        ("placeholder with a space", named("--placeholder", "[ V]"), "placeholder"),
        ("placeholder in the prompts", named("--placeholder", "photo"), "also occurs"),
        ("init token empty", named("--init-token", ""), "--init-token"),
        ("stages bogus", named("--stages", "three"), "--stages"),
        ("layers invalid regex", named("--layers", "q_proj("), "regular expression"),
        ("layers match nothing", named("--layers", "nothing_here"), "matches no parameter"),
        ("layers empty", named("--layers", ","), "--layers"),
        ("lora rank 0", named("--lora-rank", "0"), "--lora-rank"),
        ("lora every 0", named("--lora-every", "0"), "--lora-every"),
        ("stage1 steps 0", named("--stage1-steps", "0"), "--stage1-steps"),
        ("stage2 steps -1", named("--stage2-steps", "-1"), "--stage2-steps"),
        ("batch size 0", named("--batch-size", "0"), "--batch-size"),
        ("stage1 lr 0", named("--stage1-lr", "0"), "--stage1-lr"),
        ("stage1 lr nan", named("--stage1-lr", "nan"), "--stage1-lr"),
        ("stage2 lr inf", named("--stage2-lr", "inf"), "--stage2-lr"),
        ("stage2 lr text", named("--stage2-lr", "fast"), "--stage2-lr"),
        ("checkpointing steps 0", named("--checkpointing-steps", "0"), "--checkpointing-steps"),
        ("num class images 0", named("--num-class-images", "0"), "--num-class-images"),
        ("prior loss weight negative", named("--prior-loss-weight", "-1"), "--prior-loss-weight"),
        ("prior loss weight nan", named("--prior-loss-weight", "nan"), "--prior-loss-weight"),
        ("validation steps 0", named("--validation-steps", "0"), "--validation-steps"),
        ("validation prompt too long", named("--validation-prompt", "a [V] robot " * 100), "too long"),
        ("seed text", named("--seed", "x"), "--seed"),
        ("output under a file", lambda i, out: ["train", "--model", i["model"], "--images", i["refs"],
                                                "--class-name", "robot", "--output", i["file"] / "adapter"],
         "not a folder"),
        ("output holds an adapter", lambda i, out: ["train", "--model", i["model"], "--images", i["refs"],
                                                    "--class-name", "robot", "--output", i["adapter"]],
         "already holds an adapter"),
        ("output holds an unfinished run", lambda i, out: ["train", "--model", i["model"], "--images", i["refs"],
                                                           "--class-name", "robot", "--output", i["unfinished"]],
         "unfinished run"),
        ("resume with nothing to resume", named("--resume"), "nothing to resume"),
        ("resume with a conflicting flag", lambda i, out: ["train", "--output", i["unfinished"], "--resume",
                                                           "--batch-size", "4"], "conflicts"),
        ("no --output", lambda i, out: ["train", "--images", i["refs"], "--class-name", "robot"], "--output"),
    ]


def score_cases():
    def s(*extra, images=None, references=None):
        return lambda i, out: ["score", "--images", images(i) if images else i["refs"], "--references",
                               references(i) if references else i["refs"], "--dino", i["root"] / "no-dino",
                               "--clip", i["root"] / "no-clip", "--output", out / "scores.json", *extra]

    def prompts(name):
        return lambda i, out: s("--prompts", i["prompts"] / name)(i, out)

    return [
        ("images missing", s(images=lambda i: i["root"] / "nowhere"), "--images folder not found"),
        ("images empty", s(images=lambda i: i["empty"]), "no images"),
        ("images unreadable", s(images=lambda i: i["junk"]), "cannot read image"),
        ("references empty", s(references=lambda i: i["empty"]), "no images"),
        ("references missing", s(references=lambda i: i["file"]), "--references folder not found"),
        ("metrics bogus", s("--metrics", "fid"), "--metrics"),
        ("metrics empty", s("--metrics", ","), "--metrics"),
        ("prompts missing", s("--prompts", "/nonexistent/p.txt"), "not found"),
        ("prompts one line too many", prompts("three.txt"), "prompt line"),
        ("prompts json list", prompts("list.json"), "JSON object"),
        ("prompts json not text", prompts("numbers.json"), "prompt"),
        ("prompts not UTF-8", prompts("latin1.txt"), "UTF-8"),
        ("generate.json not JSON", s(images=lambda i: i["generated"]["sidecar-not-json"]), "not JSON"),
        ("generate.json lists a missing image", s(images=lambda i: i["generated"]["sidecar-lists-a-missing-image"]),
         "gone.png"),
        ("dino missing", s("--metrics", "dino"), "no-dino"),
        ("clip missing", s("--metrics", "clip-i"), "no-clip"),
        ("output under a file", lambda i, out: ["score", "--images", i["refs"], "--references", i["refs"],
                                                "--output", i["file"] / "s.json"], "--output"),
        ("output is a folder", lambda i, out: ["score", "--images", i["refs"], "--references", i["refs"],
                                               "--output", i["refs"]], "--output"),
    ]


def eval_cases():
    def d(*extra, data=None):
        return lambda i, out: ["eval", "dreambench", "--data", data(i) if data else i["dreambench"], "--model",
                               i["model"], "--output", out / "run", "--dino", i["root"] / "no-dino", "--clip",
                               i["root"] / "no-clip", *extra]

    def toy(*extra):
        return lambda i, out: ["eval", "toybench", "--output", out / "toy", *extra]

    return [
        ("dreambench data missing", d(data=lambda i: i["root"] / "nowhere"), "not found"),
        ("dreambench data not dreambench", d(data=lambda i: i["refs"]), "prompts_and_classes.txt"),
        ("dreambench unknown subject", d("--subjects", "unicorn"), "unknown subject"),
        ("dreambench images per prompt 0", d("--images-per-prompt", "0"), "--images-per-prompt"),
        ("dreambench protocol bogus", d("--protocol", "mine"), "--protocol"),
        ("dreambench cfg inf", d("--cfg", "inf"), "--cfg"),
        ("dreambench top-k 0", d("--top-k", "0"), "--top-k"),
        ("dreambench stage1 steps 0", d("--stage1-steps", "0"), "--stage1-steps"),
        ("dreambench sampler bogus", d("--sampler", "beam"), "--sampler"),
        ("dreambench sjd init without sjd", d("--sjd-init", "above"), "--sampler sjd"),
        ("dreambench sjd window past the image", d("--sampler", "sjd", "--sjd-window", "100000"), "--sjd-window"),
        ("dreambench unknown model", d("--model", "no-such-model"), "unknown model"),
        ("dreambench dino missing", d(), "no-dino"),
        ("dreambench no output", lambda i, out: ["eval", "dreambench", "--data", i["dreambench"]], "--output"),
        ("dreambench output under a file", lambda i, out: ["eval", "dreambench", "--data", i["dreambench"],
                                                           "--model", i["model"], "--output", i["file"] / "run"],
         "not a folder"),
        ("toybench subjects 0", toy("--subjects", "0"), "--subjects"),
        ("toybench seed text", toy("--seed", "x"), "--seed"),
        ("toybench sampler bogus", toy("--sampler", "beam"), "--sampler"),
        ("toybench sjd window without sjd", toy("--sjd-window", "3"), "--sampler sjd"),
        ("toybench sjd window past the image", toy("--sampler", "sjd", "--sjd-window", "100000"), "--sjd-window"),
        ("toybench clip missing", toy("--clip", "/nonexistent/clip"), "clip"),
        ("toybench output under a file", lambda i, out: ["eval", "toybench", "--output", i["file"] / "toy"],
         "not a folder"),
        ("eval without a benchmark", lambda i, out: ["eval"], "required"),
        ("eval unknown benchmark", lambda i, out: ["eval", "imagenet"], "imagenet"),
    ]


def other_cases():
    def c(*extra):
        return lambda i, out: ["convert", "vqgan", "--out", out / "vq", *extra]

    return [
        ("no command", lambda i, out: [], "required"),
        ("unknown command", lambda i, out: ["paint"], "paint"),
        ("demo out under a file", lambda i, out: ["demo", "--out", i["file"] / "demo"], "not a folder"),
        ("demo seed text", lambda i, out: ["demo", "--out", out / "demo", "--seed", "x"], "--seed"),
        ("demo sampler bogus", lambda i, out: ["demo", "--out", out / "demo", "--sampler", "beam"], "--sampler"),
        ("demo sjd init without sjd", lambda i, out: ["demo", "--out", out / "demo", "--sjd-init", "above"],
         "--sampler sjd"),
        ("demo sjd window past the image", lambda i, out: ["demo", "--out", out / "demo", "--sampler", "sjd",
                                                           "--sjd-window", "100000"], "--sjd-window"),
        ("convert without what", lambda i, out: ["convert"], "required"),
        ("convert config missing", c("--config", "/nonexistent/vqgan.yaml", "--ckpt", "/nonexistent/vqgan.ckpt"),
         "missing"),
        ("convert config not YAML", lambda i, out: c("--config", i["root"] / "bad.yaml", "--ckpt", i["file"])(i, out),
         "not a taming VQGAN config"),
        ("convert config not UTF-8", lambda i, out: c("--config", i["root"] / "latin1.yaml", "--ckpt",
                                                      i["file"])(i, out), "not UTF-8"),
        ("convert ckpt missing", lambda i, out: c("--config", i["root"] / "good.yaml", "--ckpt",
                                                  i["root"] / "nowhere.ckpt")(i, out), "missing"),
        ("convert ckpt truncated", lambda i, out: c("--config", i["root"] / "good.yaml", "--ckpt",
                                                    i["root"] / "truncated.ckpt")(i, out), "cannot read"),
        ("convert out under a file", lambda i, out: ["convert", "vqgan", "--config", i["root"] / "good.yaml",
                                                     "--ckpt", i["root"] / "truncated.ckpt", "--out",
                                                     i["file"] / "vq"], "not a folder"),
    ]


CASES = generate_cases() + train_cases() + score_cases() + eval_cases() + other_cases()


@pytest.mark.parametrize("argv,mentions", [pytest.param(a, m, id=name) for name, a, m in CASES])
def test_bad_input_gets_one_line_a_non_zero_exit_and_leaves_nothing_behind(inputs, tmp_path, monkeypatch, capsys,
                                                                         argv, mentions):
    monkeypatch.chdir(tmp_path)  # outputs with default paths land here, where they would be seen
    out = tmp_path / "out"
    before = files_under(inputs["root"], tmp_path)
    code = main([str(a) for a in argv(inputs, out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("tokenbooth: error: "), err
    assert mentions in lines[0]
    assert files_under(inputs["root"], tmp_path) == before, "left behind: " + ", ".join(
        str(p) for p in files_under(inputs["root"], tmp_path) - before)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("what", ["images folder", "prompts file", "adapter config"])
def test_an_unreadable_path_is_one_line_too(inputs, tmp_path, capsys, what):
    target = {"images folder": inputs["refs"], "prompts file": inputs["prompts"] / "three.txt",
              "adapter config": inputs["adapter"] / "adapter_config.json"}[what]
    argv = {"images folder": ["train", "--model", inputs["model"], "--images", target, "--class-name", "robot",
                              "--output", tmp_path / "o"],
            "prompts file": ["score", "--images", inputs["refs"], "--references", inputs["refs"], "--prompts", target],
            "adapter config": ["generate", GOOD_PROMPT, "--model", inputs["model"], "--adapter", inputs["adapter"],
                               "--out", tmp_path / "o"]}[what]
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        code = main([str(a) for a in argv])
    finally:
        target.chmod(mode)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("tokenbooth: error: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,starts", [(["plan", "--gpu-memory", "24", "bananas"], "tokenbooth: error: unrecognized"),
                                         (["generate", "--steps"], "tokenbooth: error: generate: ")])
def test_a_flag_argparse_refuses_names_the_program_once(capsys, argv, starts):
    assert main(argv) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(starts) and line.count("tokenbooth:") == 1, line
