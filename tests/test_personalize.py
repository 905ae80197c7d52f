"""The two-stage recipe on the tiny model: what each stage may change, adapters, resume, bad input."""

from __future__ import annotations

import hashlib
import shutil

from types import SimpleNamespace

import pytest
from helpers import quick, run_cli, subject_images
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenbooth.backbones import load_backbone
from tokenbooth.errors import UserError
from tokenbooth.personalize import TrainConfig, load_adapter, load_reference_images, train
from tokenbooth.sampling import SamplingConfig, sample_image_tokens


@pytest.fixture
def fresh(tiny_model_dir):
    """A freshly loaded tiny backbone: training changes the model in memory."""
    return load_backbone(str(tiny_model_dir))


def params_of(backbone):
    return {k: v.detach().clone() for k, v in backbone.model.named_parameters()}


def changed(before, backbone):
    """Names (as before training) of the parameters that differ now. LoRA wraps a projection and renames its
    weight `...q_proj.base_layer.weight`: that is still the base weight and is compared under its old name."""
    after = {k.replace(".base_layer.", "."): v for k, v in backbone.model.named_parameters() if ".lora_" not in k}
    assert after.keys() == before.keys(), "parameters appeared or disappeared"
    return {k for k in before if not torch.equal(before[k], after[k].detach())}


def test_stage1_changes_only_the_placeholder_row(fresh, refs, tmp_path):
    before = params_of(fresh)
    out = train(fresh, refs, quick("model", stages="embedding"), tmp_path / "a", progress=False)
    assert changed(before, fresh) == set()  # the embedding table itself is bit-identical
    learned = load_file(str(out / "learned_embeds.safetensors"))["[V]"]
    assert learned.dtype == torch.float32 and learned.shape == (fresh.model.config.hidden_size,)
    assert not (out / "layers.safetensors").exists()


def test_stage2_changes_only_the_chosen_layers(fresh, refs, tmp_path):
    before = params_of(fresh)
    out = train(fresh, refs, quick("model"), tmp_path / "a", progress=False)
    moved = changed(before, fresh)
    assert moved and all(k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj") for k in moved)
    saved = load_file(str(out / "layers.safetensors"))
    assert set(saved) == {k for k in before if k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj")}


def test_named_targets_and_lora_every_other_layer(fresh, refs, tmp_path):
    before = params_of(fresh)
    train(fresh, refs, quick("model", layers=r"layers\.1\.mlp\.down_proj"), tmp_path / "named", progress=False)
    assert changed(before, fresh) == {"model.layers.1.mlp.down_proj.weight"}


def test_lora_trains_adapters_and_leaves_base_weights(fresh, refs, tmp_path):
    before = params_of(fresh)
    out = train(fresh, refs, quick("model", layers="lora", lora_rank=2, lora_every=2), tmp_path / "lora",
                progress=False)
    assert changed(before, fresh) == set()
    lora = load_file(str(out / "lora" / "adapter_model.safetensors"))
    assert lora and all(".layers.0." in k for k in lora)  # every 2nd of 2 layers: layer 0 only
    assert (out / "lora" / "adapter_config.json").exists()


def test_the_base_model_on_disk_is_untouched(tiny_model_dir, refs, tmp_path):
    digest = lambda: hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    before = digest()
    train(load_backbone(str(tiny_model_dir)), refs, quick("model"), tmp_path / "a", progress=False)
    assert digest() == before


@pytest.mark.parametrize("layers", ["qkv", "lora"])
def test_a_saved_adapter_gives_the_same_images_as_the_trained_model(tiny_model_dir, refs, tmp_path, layers):
    trained = load_backbone(str(tiny_model_dir))
    out = train(trained, refs, quick("model", layers=layers), tmp_path / "a", progress=False)
    reloaded = load_adapter(load_backbone(str(tiny_model_dir)), out)
    # the trained backbone in memory, with [V] written in, against base + adapter from disk
    from tokenbooth.personalize.adapter import PersonalizedBackbone

    with torch.no_grad():
        trained.input_embeddings().weight[reloaded.tokenizer.token_to_id(reloaded.placeholder_token)] = \
            load_file(str(out / "learned_embeds.safetensors"))["[V]"]
    in_memory = PersonalizedBackbone(trained, "[V]", reloaded.placeholder_token)
    cfg = SamplingConfig.for_family("mini", seed=11, image_top_k=1)
    a = sample_image_tokens(in_memory, ["a [V] robot on the beach"], cfg)
    b = sample_image_tokens(reloaded, ["a [V] robot on the beach"], cfg)
    assert torch.equal(a, b)


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(tiny_model_dir, refs, tmp_path):
    cfg = quick("model", checkpointing_steps=2)
    whole = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "whole", progress=False)
    part = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "part", progress=False, stop_after=4)
    assert not (part / "adapter_config.json").exists()
    train(load_backbone(str(tiny_model_dir)), refs, cfg, part, progress=False, resume=True)
    for name in ("learned_embeds.safetensors", "layers.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_joint_trains_both_from_the_first_step(fresh, refs, tmp_path):
    before = params_of(fresh)
    out = train(fresh, refs, quick("model", stages="joint", stage1_steps=1, stage2_steps=1), tmp_path / "j",
                progress=False)
    assert changed(before, fresh) and (out / "layers.safetensors").exists()


def test_an_adapter_for_another_base_is_refused(tiny_model_dir, refs, tmp_path):
    out = train(load_backbone(str(tiny_model_dir)), refs, quick("model", stages="embedding"), tmp_path / "a",
                progress=False)
    other = tmp_path / "other-model"
    from helpers import build_tiny_model_folder

    build_tiny_model_folder(other, seed=1)
    with pytest.raises(UserError, match="another base model"):
        load_adapter(load_backbone(str(other)), out)


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(fresh, refs, tmp_path, monkeypatch):
    from tokenbooth.personalize import recipe

    calls, loss = [], recipe.batch_loss

    def nan_from_step_2(*args):  # non-finite learning rates are refused up front, so the loss is made nan
        calls.append(1)
        return loss(*args) * (float("nan") if len(calls) > 1 else 1.0)

    monkeypatch.setattr(recipe, "batch_loss", nan_from_step_2)
    with pytest.raises(UserError, match=r"loss became nan at step 2.*last good checkpoint: .*step-1"):
        train(fresh, refs, quick("model", checkpointing_steps=1), tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan" / "adapter_config.json").exists()


def test_a_full_disk_during_save_leaves_no_adapter_behind(fresh, refs, tmp_path, monkeypatch):
    import tokenbooth.personalize.adapter as adapter

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter, "_jsonable", full_disk)  # fails in the middle of writing the adapter
    with pytest.raises(UserError, match="no space left on the device"):  # one line, not a traceback
        train(fresh, refs, quick("model", layers="lora"), tmp_path / "full", progress=False)
    assert not (tmp_path / "full" / "adapter_config.json").exists()
    assert not (tmp_path / "full" / "learned_embeds.safetensors").exists()  # none of its files, not some
    assert not list((tmp_path / "full").rglob("*.tmp"))


# --- reference images ---------------------------------------------------------------------------------

def test_images_any_format_exif_transparency_and_size(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGBA", (40, 20), (255, 0, 0, 0)).save(folder / "clear.png")  # transparent: composited on white
    rotated = Image.new("RGB", (30, 60), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(folder / "phone.jpg", exif=exif)
    Image.new("RGB", (8, 8), (0, 255, 0)).save(folder / "tiny.webp")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    Image.new("RGB", (4000, 3000), (10, 20, 30)).save(folder / "huge.jpg", quality=50)
    images = load_reference_images(folder, 16)
    err = capsys.readouterr().err
    assert len(images) == 4 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    assert "skipping broken.jpg" in err and "tiny.webp" in err and "upscaling" in err
    clear = images[[p.name for p in sorted(folder.iterdir()) if p.name != "broken.jpg"].index("clear.png")]
    assert clear.getpixel((8, 8)) == (255, 255, 255)


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "image folder not found"),
    (lambda d: d.mkdir(), "no images in"),
    (lambda d: (d.mkdir(), (d / "a.png").write_bytes(b"junk")), "no readable image"),
])
def test_unusable_image_folders(tmp_path, setup, message):
    folder = tmp_path / "subject"
    setup(folder)
    with pytest.raises(UserError, match=message):
        load_reference_images(folder, 16)


# --- the command ------------------------------------------------------------------------------------

def cli(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    return code, SimpleNamespace(out=out, err=err)


def test_train_then_generate_with_the_adapter(tiny_model_dir, tmp_path, capsys):
    refs_dir = subject_images(tmp_path / "refs")
    out = tmp_path / "adapter"
    code, io = cli(capsys, "train", "--model", str(tiny_model_dir), "--images", str(refs_dir), "--class-name", "robot",
                   "--output", str(out), "--stage1-steps", "2", "--stage2-steps", "1", "--batch-size", "2",
                   "--validation-prompt", "a [V] robot in the snow", "--validation-steps", "2")
    assert code == 0, io.err
    for name in ("adapter_config.json", "learned_embeds.safetensors", "layers.safetensors", "log.jsonl", "loss.png",
                 "validation/step-2.png", "validation/final.png"):
        assert (out / name).exists(), name
    code, io = cli(capsys, "generate", "a [V] robot on the beach", "--model", str(tiny_model_dir), "--adapter", str(out),
                   "-n", "1", "--out", str(tmp_path / "gen"))
    assert code == 0 and (tmp_path / "gen" / "grid.png").exists()
    code, io = cli(capsys, "generate", "a robot", "--model", str(tiny_model_dir), "--adapter", str(out), "-n", "1",
                   "--out", str(tmp_path / "gen2"))
    assert code == 0 and "does not mention [V]" in io.err
    code, io = cli(capsys, "train", "--model", str(tiny_model_dir), "--images", str(refs_dir), "--class-name", "robot",
                   "--output", str(out))
    assert code != 0 and "already holds an adapter" in io.err


def test_cli_resume_latest(tiny_model_dir, tmp_path, capsys):
    refs_dir = subject_images(tmp_path / "refs")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--images", str(refs_dir), "--class-name", "robot",
            "--output", str(out), "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2",
            "--checkpointing-steps", "2"]
    code, _ = cli(capsys, *args)
    assert code == 0
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "adapter_config.json").unlink()
    code, io = cli(capsys, *args, "--resume")
    assert code == 0, io.err
    assert (out / "adapter_config.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--class-name", "robot", "--no-class-name"], "contradict"),
    ([], "--class-name is required"),
    (["--class-name", "robot", "--placeholder", "a"], "also occurs"),
    (["--class-name", "robot", "--stage1-steps", "0"], "--stage1-steps"),
    (["--class-name", "robot", "--layers", "no_such_module"], "matches no parameter"),
])
def test_train_bad_settings(tiny_model_dir, tmp_path, capsys, extra, message):
    refs_dir = subject_images(tmp_path / "refs", n=2)
    code, io = cli(capsys, "train", "--model", str(tiny_model_dir), "--images", str(refs_dir), "--output",
                   str(tmp_path / "o"), *extra)
    assert code != 0 and message in io.err and len(io.err.strip().splitlines()) == 1


def test_an_adapter_from_another_model_is_refused_by_generate(tiny_model_dir, tmp_path, capsys):
    refs_dir = subject_images(tmp_path / "refs", n=1)
    out = tmp_path / "a"
    assert cli(capsys, "train", "--model", str(tiny_model_dir), "--images", str(refs_dir), "--class-name", "robot",
               "--output", str(out), "--stages", "embedding", "--stage1-steps", "1", "--batch-size", "1")[0] == 0
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = (other / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05')
    (other / "config.json").write_text(cfg)
    code, io = cli(capsys, "generate", "a [V] robot", "--model", str(other), "--adapter", str(out), "--out", str(tmp_path / "g"))
    assert code != 0 and "another base model" in io.err


def test_prior_preservation_draws_class_images_once_and_trains_on_them(tiny_model_dir, refs, tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = quick("model", prior_preservation=True, num_class_images=2, stages="embedding")
    out = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "prior", progress=False)
    assert load_file(str(out / "class_tokens.safetensors"))["codes"].shape == (2, 8, 8)
    # a cached set is used as it is, not drawn again
    seeded = tmp_path / "seeded"
    seeded.mkdir()
    save_file({"codes": torch.zeros(2, 8, 8, dtype=torch.long)}, str(seeded / "class_tokens.safetensors"))
    before = (seeded / "class_tokens.safetensors").read_bytes()
    train(load_backbone(str(tiny_model_dir)), refs, cfg, seeded, progress=False)
    assert (seeded / "class_tokens.safetensors").read_bytes() == before
    # the class term is in the loss: same subject batch, plus a positive prior term
    plain = train(load_backbone(str(tiny_model_dir)), refs, quick("model", stages="embedding"), tmp_path / "plain",
                  progress=False)
    first = lambda folder: json.loads((folder / "log.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert first(out) > first(plain)


def test_on_mini_stage1_loss_falls_and_stage2_lowers_it_further():
    """The demo subject on the real mini: the recipe must actually learn, not just run."""
    import contextlib
    import json
    import tempfile
    from pathlib import Path

    from tokenbooth.personalize.recipe import Placeholder, batch_loss, make_batch, reference_tokens
    from tokenbooth.toyworld import demo_subject

    mini = load_backbone("mini")
    images = load_reference_images(demo_subject.FOLDER, mini.resolution)
    cfg = TrainConfig.for_family(mini.family, class_name="robot")
    with tempfile.TemporaryDirectory() as out:
        # the demo's run: mini's defaults, 100 + 60 steps, about 50 s
        train(mini, images, cfg, Path(out), progress=False)
        log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
        stage1_end = Path(out) / "checkpoints" / f"step-{cfg.stage1_steps}" / "trainable.safetensors"
        learned = load_file(str(stage1_end))["placeholder"]
    # Stage 1 moves mini v2's loss only a few hundredths of a nat, less than the step-to-step noise of the
    # training log; so [V] is scored before and after stage 1 on the same held batches (the base model
    # fresh: stage 2 changed the one above in memory).
    base = load_backbone("mini")
    start = Placeholder(base, cfg, torch.Generator().manual_seed(cfg.seed))  # the run's own initial [V]
    after = Placeholder(base, cfg, torch.Generator().manual_seed(cfg.seed))
    after.embedding.data.copy_(learned)
    codes = reference_tokens(base, images, cfg.flip)

    def held_loss(placeholder):
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(batch_loss(base, placeholder, *make_batch(base, placeholder, cfg, codes, generator, True),
                                  contextlib.nullcontext).item() for _ in range(4)) / 4

    assert held_loss(after) < held_loss(start) - 0.01  # [V] alone explains a little of the subject
    stage1 = [r["loss"] for r in log if r["stage"] == "embedding"]
    stage2 = [r["loss"] for r in log if r["stage"] == "layers"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(stage2[-10:]) < mean(stage1[-50:]) - 0.3  # the layers joining explain much more


# --- one source for each setting, and what a run records ------------------------------------------------

def test_the_family_table_is_the_only_source_of_per_family_settings():
    from tokenbooth.backbones.families import FAMILIES

    with pytest.raises(TypeError):
        TrainConfig(class_name="robot")  # no stage steps, rates or batch size of its own
    with pytest.raises(TypeError):
        SamplingConfig(seed=0)  # no guidance or top-k of its own
    for family, row in FAMILIES.items():
        assert {k: getattr(TrainConfig.for_family(family), k) for k in row.train} == row.train
        assert {k: getattr(SamplingConfig.for_family(family), k) for k in row.sample} == row.sample


def test_class_and_validation_images_are_drawn_with_the_familys_sampling_settings(fresh, refs, tmp_path,
                                                                                   monkeypatch):
    import sys

    import tokenbooth.sampling as sampling

    seen = []
    real = sampling.draw_codes

    def spy(backbone, prompts, cfg, *args, **kw):
        seen.append(cfg)
        return real(backbone, prompts, cfg, *args, **kw)

    monkeypatch.setattr(sampling, "draw_codes", spy)  # class images
    monkeypatch.setattr(sys.modules["tokenbooth.sampling.draw"], "draw_codes", spy)  # validation grids, via draw()
    cfg = quick("model", stages="embedding", prior_preservation=True, num_class_images=2,
                validation_prompts=["a [V] robot"], validation_steps=2, seed=3)
    train(fresh, refs, cfg, tmp_path / "a", progress=False)
    mini = SamplingConfig.for_family("mini", seed=3)
    assert len(seen) >= 3 and all(c == mini for c in seen)  # class images, step-2 and final validation grids


def test_an_adapter_records_its_sampling_settings_and_generate_uses_them_unless_a_flag_overrides(
        tiny_model_dir, tmp_path, capsys):
    import json

    refs_dir = subject_images(tmp_path / "refs")
    out = tmp_path / "adapter"
    code, io = cli(capsys, "train", "--model", tiny_model_dir, "--images", refs_dir, "--class-name", "robot",
                   "--output", out, "--stages", "embedding", "--stage1-steps", "1", "--batch-size", "1")
    assert code == 0, io.err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["sampling"] == SamplingConfig.for_family("mini").distribution()
    config["sampling"].update(cfg_scale=2.5, temperature=0.7)  # as if it had been validated so
    (out / "adapter_config.json").write_text(json.dumps(config))
    gen = lambda name, *flags: cli(capsys, "generate", "a [V] robot", "--model", tiny_model_dir, "--adapter", out,  # noqa: E731
                                   "-n", "1", "--out", tmp_path / name, *flags)
    assert gen("recorded")[0] == 0
    used = json.loads((tmp_path / "recorded" / "generate.json").read_text())
    assert used["cfg_scale"] == 2.5 and used["temperature"] == 0.7 and used["image_top_k"] == 2000
    assert gen("flag", "--cfg", "3")[0] == 0
    used = json.loads((tmp_path / "flag" / "generate.json").read_text())
    assert used["cfg_scale"] == 3.0 and used["temperature"] == 0.7


def test_resume_refuses_a_flag_that_would_change_the_run(tiny_model_dir, tmp_path, capsys):
    refs_dir, other_refs = subject_images(tmp_path / "refs"), subject_images(tmp_path / "other", n=2)
    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--images", refs_dir, "--class-name", "robot", "--output", out,
            "--stages", "embedding", "--stage1-steps", "4", "--batch-size", "1", "--checkpointing-steps", "2"]
    assert cli(capsys, *args)[0] == 0
    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "adapter_config.json").unlink()
    for flag, value in (("--images", other_refs), ("--class-name", "teddy"), ("--stage1-steps", "9"),
                        ("--seed", "1"), ("--flip", None)):
        resumed = ["train", "--output", out, "--resume", flag, *([] if value is None else [value])]
        code, io = cli(capsys, *resumed)
        assert code == 1 and flag in io.err and "conflicts with the run" in io.err, io.err
        assert len(io.err.strip().splitlines()) == 1 and not (out / "adapter_config.json").exists()
    code, io = cli(capsys, "train", "--output", out, "--resume", "--stage1-steps", "4")  # agreeing is fine
    assert code == 0, io.err
    assert (out / "adapter_config.json").exists()


def test_training_sequences_longer_than_the_context_are_refused_before_anything_is_written(tiny_model_dir,
                                                                                          tmp_path, capsys):
    refs_dir = subject_images(tmp_path / "refs")
    code, io = cli(capsys, "train", "--model", tiny_model_dir, "--images", refs_dir, "--output", tmp_path / "o",
                   "--class-name", "very big shiny metal robot " * 12)
    assert code == 1 and "training sequences too long" in io.err and "context holds 160" in io.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("layers,message", [("no_such_module", "matches no parameter"),
                                            ("q_proj(", "not a regular expression")])
def test_a_bad_layers_flag_leaves_nothing_behind(tiny_model_dir, tmp_path, capsys, layers, message):
    refs_dir = subject_images(tmp_path / "refs")
    code, io = cli(capsys, "train", "--model", tiny_model_dir, "--images", refs_dir, "--class-name", "robot",
                   "--output", tmp_path / "o", "--layers", layers)
    assert code == 1 and message in io.err and len(io.err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_single_surviving_reference_image_trains_with_a_warning(tmp_path, capsys):
    folder = subject_images(tmp_path / "refs", n=2)
    (folder / "ref1.png").write_bytes(b"broken")
    images = load_reference_images(folder, 16)
    err = capsys.readouterr().err
    assert len(images) == 1 and "skipping ref1.png" in err and "only one usable image" in err


def test_bfloat16_compute_keeps_trainable_weights_fp32_and_an_unknown_dtype_is_refused(tiny_backbone):
    from tokenbooth.personalize.recipe import _autocast_for, check_train_values

    weight = tiny_backbone.model.model.layers[0].self_attn.q_proj.weight
    x = torch.randn(2, 8, weight.shape[1])
    with _autocast_for(tiny_backbone, "bfloat16")():
        y = tiny_backbone.model.model.layers[0].self_attn.q_proj(x)
    assert weight.dtype == torch.float32 and y.dtype == torch.bfloat16
    with _autocast_for(tiny_backbone, "model")():
        assert tiny_backbone.model.model.layers[0].self_attn.q_proj(x).dtype == torch.float32
    with pytest.raises(UserError, match="compute_dtype"):
        check_train_values({"compute_dtype": "float8"})


def test_several_vectors_learn_one_row_each_and_reload_into_the_same_images(tiny_model_dir, refs, tmp_path):
    """--num-vectors 3: [V] becomes three reserved tokens; each learns its own row, the adapter holds a (3, width)
    matrix, and base + adapter draws what the trained model draws."""
    trained = load_backbone(str(tiny_model_dir))
    out = train(trained, refs, quick("model", num_vectors=3, checkpointing_steps=2), tmp_path / "a", progress=False)
    learned = load_file(str(out / "learned_embeds.safetensors"))["[V]"]
    width = trained.model.config.hidden_size
    assert learned.shape == (3, width)
    assert not torch.allclose(learned[0], learned[1]) and not torch.allclose(learned[1], learned[2])
    reloaded = load_adapter(load_backbone(str(tiny_model_dir)), out)
    tokens = trained.placeholder_candidates()[:3]
    assert reloaded.placeholder_token == "".join(tokens)
    prompt_ids = reloaded.prompt_ids("a [V] robot")
    ids = [reloaded.tokenizer.token_to_id(t) for t in tokens]
    assert all(prompt_ids.count(i) == 1 for i in ids)  # every row is in the prompt, once
    table = reloaded.input_embeddings().weight
    assert torch.equal(table[ids].float(), learned.to(table.dtype).float())
    from tokenbooth.personalize.adapter import PersonalizedBackbone

    with torch.no_grad():
        trained.input_embeddings().weight[ids] = learned.to(table.dtype)
    in_memory = PersonalizedBackbone(trained, "[V]", "".join(tokens))
    cfg = SamplingConfig.for_family("mini", seed=5, image_top_k=1)
    drawn = [sample_image_tokens(model, ["a [V] robot"], cfg) for model in (in_memory, reloaded)]
    assert torch.equal(*drawn)


def test_one_vector_keeps_the_single_token_format_and_more_than_the_free_rows_are_refused(fresh, refs, tmp_path):
    from tokenbooth.personalize.adapter import read_adapter_config

    out = train(fresh, refs, quick("model", stages="embedding"), tmp_path / "one", progress=False)
    cfg = read_adapter_config(out)
    assert cfg["placeholder_tokens"] == [cfg["placeholder_token"]]
    assert cfg["placeholder_token_ids"] == [cfg["placeholder_token_id"]]
    free = len(fresh.placeholder_candidates())
    with pytest.raises(UserError, match=f"has {free} free vocabulary row"):
        train(fresh, refs, quick("model", num_vectors=free + 1), tmp_path / "many", progress=False)
    assert not (tmp_path / "many").exists()


def test_an_adapter_whose_embedding_rows_do_not_match_its_tokens_is_refused(tiny_model_dir, refs, tmp_path):
    import json

    out = train(load_backbone(str(tiny_model_dir)), refs, quick("model", stages="embedding", num_vectors=2),
                tmp_path / "a", progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config["placeholder_tokens"] = config["placeholder_tokens"][:1]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="placeholder_tokens"):
        load_adapter(load_backbone(str(tiny_model_dir)), broken)


# --- fidelity along the run -------------------------------------------------------------------------

def test_validation_pictures_are_scored_for_fidelity_along_the_run_and_plotted_under_the_loss(fresh, refs, tmp_path):
    import json

    from tokenbooth.eval.fidelity import fidelity_scorer

    cfg = quick("model", validation_prompts=["a [V] robot", "a [V] robot on the beach"], validation_steps=2)
    out = train(fresh, refs, cfg, tmp_path / "a", progress=False, fidelity_scorer=fidelity_scorer)
    records = [json.loads(line) for line in (out / "fidelity.jsonl").read_text().splitlines()]
    # 3 + 2 steps: grids at steps 2 and 4 and the final one; the family's encoder is mini's toyDINO
    assert [(r["step"], r["stage"]) for r in records] == [(2, "embedding"), (4, "layers"), (5, "final")]
    assert all(-1 <= r["fidelity"] <= 1 and r["encoder"] == "toyDINO" for r in records)
    with Image.open(out / "loss.png") as plot:  # the fidelity curve under the loss curve
        assert plot.height == 2 * 360


def test_the_fidelity_score_is_dreambenchs_dino_score_against_the_references(fresh, refs):
    from tokenbooth.assets import TOYDINO_DIR
    from tokenbooth.eval.metrics import load_dino
    from tokenbooth.eval.fidelity import fidelity_scorer

    score = fidelity_scorer(fresh, refs)
    same, _ = score(refs)
    features = load_dino(str(TOYDINO_DIR)).embed_images(refs)
    assert abs(same - float((features @ features.T).mean())) < 1e-5
    blank, _ = score([Image.new("RGB", (16, 16), "black")] * 2)
    assert blank < same


def test_without_the_familys_encoder_the_run_goes_on_with_its_loss_alone(fresh, refs, tmp_path, monkeypatch, capsys):
    import dataclasses

    from tokenbooth.backbones import families
    from tokenbooth.eval.fidelity import fidelity_scorer

    missing = dataclasses.replace(families.FAMILIES["mini"], fidelity=str(tmp_path / "no-encoder-here"))
    monkeypatch.setitem(families.FAMILIES, "mini", missing)
    out = train(fresh, refs, quick("model", validation_prompts=["a [V] robot"], validation_steps=2), tmp_path / "a",
                progress=False, fidelity_scorer=fidelity_scorer)
    assert (out / "validation" / "final.png").exists() and not (out / "fidelity.jsonl").exists()
    assert "not scored for fidelity" in capsys.readouterr().err


def test_a_run_given_no_fidelity_scorer_draws_its_validation_pictures_and_scores_none(fresh, refs, tmp_path):
    """Training does not load evaluation's encoders itself: the caller passes the scorer in."""
    out = train(fresh, refs, quick("model", validation_prompts=["a [V] robot"], validation_steps=2), tmp_path / "a",
                progress=False)
    assert (out / "validation" / "step-2.png").exists() and (out / "validation" / "final.png").exists()
    assert not (out / "fidelity.jsonl").exists()


def test_bfloat16_compute_falls_back_to_float32_only_on_a_cpu_without_native_bfloat16(monkeypatch, capsys):
    from tokenbooth.personalize import loss

    monkeypatch.setattr(loss, "cpu_has_native_bfloat16", lambda: False)
    assert loss.runnable_compute_dtype("bfloat16", "cpu") == "float32"
    assert "no native bfloat16" in capsys.readouterr().err
    assert loss.runnable_compute_dtype("bfloat16", "cuda") == "bfloat16"
    assert loss.runnable_compute_dtype("model", "cpu") == "model"
    monkeypatch.setattr(loss, "cpu_has_native_bfloat16", lambda: True)
    assert loss.runnable_compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert capsys.readouterr().err == ""
