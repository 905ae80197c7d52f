"""`tokenbooth generate` end to end on the tiny model, and every bad input the foundation lists."""

import json
import shutil
import subprocess
import sys

import pytest
from helpers import run_cli as run



def test_generate_writes_images_grid_and_a_sidecar_with_every_setting(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, "generate", "a red robot on the beach", "--model", str(tiny_model_dir), "-n", "3",
                          "--seed", "7", "--out", str(out))
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["generate.json", "grid.png", "image-000.png", "image-001.png",
                                                     "image-002.png"]
    meta = json.loads((out / "generate.json").read_text())
    assert meta["prompt"] == "a red robot on the beach" and meta["seed"] == 7 and meta["cfg_scale"] == 2.0  # the tiny model is of the mini family
    assert meta["image_top_k"] == 2000 and meta["model"] == str(tiny_model_dir) and "tokenbooth_version" in meta


def test_existing_outputs_are_not_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    args = ["generate", "a cup", "--model", str(tiny_model_dir), "-n", "1", "--out", str(tmp_path)]
    assert run(capsys, *args)[0] == 0
    before = (tmp_path / "image-000.png").read_bytes()
    code, _, err = run(capsys, *args, "--seed", "9")
    assert code != 0 and "already exists" in err
    assert (tmp_path / "image-000.png").read_bytes() == before
    assert run(capsys, *args, "--seed", "9", "--overwrite")[0] == 0


@pytest.mark.parametrize("extra,message", [
    (["--cfg", "-1"], "--cfg"),
    (["--top-k", "0"], "--top-k"),
    (["-n", "0"], "-n"),
])
def test_bad_settings_get_one_line_and_a_non_zero_exit(tiny_model_dir, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "generate", "a cup", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *extra)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "grid.png").exists()


def test_unknown_model_and_missing_path(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a cup", "--model", "no-such-model", "--out", str(tmp_path))
    assert code != 0 and "unknown model" in err
    code, _, err = run(capsys, "generate", "a cup", "--model", str(tmp_path / "nowhere" / "x"), "--out", str(tmp_path))
    assert code != 0 and "unknown model" in err


def test_truncated_weights_are_one_clear_line(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    code, _, err = run(capsys, "generate", "a cup", "--model", str(broken), "--out", str(tmp_path / "o"))
    assert code != 0 and "cannot load" in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_shape_are_refused(tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "generate", "a cup", "--model", str(other), "--out", str(tmp_path / "o"))
    assert code != 0 and "do not match" in err


def test_a_prompt_longer_than_the_context(tiny_model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red robot " * 200, "--model", str(tiny_model_dir), "--out", str(tmp_path))
    assert code != 0 and "prompt too long" in err


def test_an_output_folder_that_cannot_be_written(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, "generate", "a cup", "--model", str(tiny_model_dir), "--out", str(blocker / "sub"))
    assert code != 0 and "cannot create output folder" in err


def test_the_console_script_prints_no_traceback_on_a_user_mistake(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenbooth", "generate", "x", "--model", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("tokenbooth: error:")


def test_version_and_help_describe_this_install_and_every_command(capsys):
    """The console script answers --version with the package's version and --help with every subcommand, and
    each subcommand's own --help renders (a broken flag declaration would only show when that help is asked)."""
    import argparse

    import tokenbooth
    from tokenbooth.cli import build_parser

    version = subprocess.run([sys.executable, "-m", "tokenbooth", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"tokenbooth {tokenbooth.__version__}"
    helped = subprocess.run([sys.executable, "-m", "tokenbooth", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0
    [subcommands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subcommands.choices) == 8
    for name in subcommands.choices:
        assert name in helped.stdout
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: tokenbooth {name}")


def test_sampling_help_shows_each_familys_defaults_from_the_family_table(capsys):
    """`generate --help` states the guidance scale and top-k every family samples with, read from the table
    that decides them (so it cannot say 1.5 for mini while mini samples at 2.0)."""
    from tokenbooth.backbones.families import FAMILIES
    from tokenbooth.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for name, defaults in FAMILIES.items():
        assert f"{name} {defaults.sample['cfg_scale']}" in text and f"{name} {defaults.sample['image_top_k']}" in text


def test_a_failed_generate_leaves_no_output_folder(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    code, _, err = run(capsys, "generate", "a red robot " * 200, "--model", str(tiny_model_dir), "--out", str(out))
    assert code != 0 and "prompt too long" in err
    assert not (tmp_path / "new").exists()


def test_help_shows_each_familys_default_where_the_family_decides(capsys):
    from tokenbooth.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lumina-mgpt 4.0 (paper), janus-pro 5.0, mini 2.0" in text and "lumina-mgpt 2000 (paper)" in text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "lumina-mgpt 1500 (paper), janus-pro 1500, mini 100" in text and "lumina-mgpt 5e-06 (paper)" in text


def test_transformers_is_pinned_to_the_range_the_tests_run_on():
    import re
    from pathlib import Path

    import transformers
    from packaging.specifiers import SpecifierSet

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'"transformers([^"]+)"', pyproject).group(1))
    assert transformers.__version__ in spec and "5.40" not in spec  # deprecations announced for 5.40


# --- -n images, drawn --batch-size at a time -----------------------------------------------------------------

def _sidecar(out):
    return json.loads((out / "generate.json").read_text())


def test_n_is_the_number_of_images_and_batch_size_how_many_are_drawn_at_once(tiny_model_dir, tmp_path, capsys):
    many, one_batch = tmp_path / "many", tmp_path / "one-batch"
    code, _, _ = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 5, "--batch-size", 2, "--out", many)
    assert code == 0
    meta = _sidecar(many)
    assert meta["num_images"] == 5 and meta["batch_size"] == 2
    assert meta["images"] == [f"image-{i:03d}.png" for i in range(5)] and (many / "grid.png").is_file()
    assert sorted(p.name for p in many.iterdir()) == sorted([*meta["images"], "grid.png", "generate.json"])
    # The first batch samples with the run's seed: what a run of that batch alone draws.
    assert run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 2, "--out", one_batch)[0] == 0
    for name in ("image-000.png", "image-001.png"):
        assert (many / name).read_bytes() == (one_batch / name).read_bytes()
    assert (many / "image-002.png").read_bytes() != (one_batch / "image-000.png").read_bytes()


def test_the_batch_defaults_to_the_family_table_and_never_exceeds_n(tiny_model_dir, tmp_path, capsys):
    from tokenbooth.backbones.families import FAMILIES

    assert run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 6, "--out", tmp_path / "a")[0] == 0
    assert _sidecar(tmp_path / "a")["batch_size"] == FAMILIES["mini"].sample_batch_size  # the tiny model is mini's
    assert run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 2, "--batch-size", 8,
               "--out", tmp_path / "b")[0] == 0
    meta = _sidecar(tmp_path / "b")
    assert meta["batch_size"] == 2 and len(meta["images"]) == 2


@pytest.mark.parametrize("extra,message", [
    (["-n", "-1"], "must be >= 1"),
    (["-n", "10001"], "at most 10000"),
    (["-n", "100000000"], "at most 10000"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_absurd_image_counts_and_batches_are_refused_in_one_line_before_anything_is_written(
        tiny_model_dir, tmp_path, capsys, extra, message):
    code, _, err = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "--out", tmp_path / "o", *extra)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


class CheapSampler:
    """Stands in for the sampler: random codes at once, recording each batch's size and how many images of
    earlier batches are still alive (weak references, after a garbage collection) when the next is drawn."""

    def __init__(self, monkeypatch, fail_on_call: int | None = None):
        import importlib
        import weakref

        draw_module = importlib.import_module("tokenbooth.sampling.draw")  # the package's `draw` is the function

        self.sizes, self.alive_before, self.images = [], [], []  # weak references
        self.fail_on_call = fail_on_call
        real_to_pil = draw_module.tensor_to_pil

        def to_pil(pixels):
            images = real_to_pil(pixels)
            self.images += [weakref.ref(image) for image in images]
            return images

        monkeypatch.setattr(draw_module, "draw_codes", self.draw_codes)
        monkeypatch.setattr(draw_module, "tensor_to_pil", to_pil)

    def draw_codes(self, backbone, prompts, cfg, progress=False, stats=None):
        import gc

        import torch

        if len(self.sizes) + 1 == self.fail_on_call:
            raise KeyboardInterrupt
        gc.collect()
        self.alive_before.append(sum(ref() is not None for ref in self.images))
        self.sizes.append(len(prompts))
        layout = backbone.layout
        return torch.randint(layout.codebook_size, (len(prompts), layout.rows, layout.cols),
                             generator=torch.Generator().manual_seed(cfg.seed))


def test_a_large_n_holds_one_batch_at_a_time(tiny_model_dir, tmp_path, capsys, monkeypatch):
    sampler = CheapSampler(monkeypatch)
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 203, "--batch-size", 8, "--out", out)
    assert code == 0
    assert sampler.sizes == [8] * 25 + [3]
    assert set(sampler.alive_before) == {0}  # no image of an earlier batch is held while the next is drawn
    assert len(_sidecar(out)["images"]) == 203 and len(list(out.glob("image-*.png"))) == 203


def test_an_interrupted_generate_keeps_its_finished_batches_and_lists_exactly_them(tiny_model_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    CheapSampler(monkeypatch, fail_on_call=3)
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 10, "--batch-size", 2,
                       "--out", out)
    assert code == 130 and "interrupted" in err
    kept = [f"image-{i:03d}.png" for i in range(4)]
    assert _sidecar(out)["images"] == kept and _sidecar(out)["num_images"] == 10
    assert sorted(p.name for p in out.iterdir()) == sorted([*kept, "grid.png", "generate.json"])  # no temporary files


def test_an_interruption_while_a_batch_is_saved_removes_that_batch(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import tokenbooth.commands.generate as generate

    saves = []
    real_save = generate.atomic_save_image

    def save(image, path):
        saves.append(path.name)
        if path.name == "image-003.png":
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(generate, "atomic_save_image", save)
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 6, "--batch-size", 2, "--out", out)
    assert code == 130 and "image-002.png" in saves
    assert _sidecar(out)["images"] == ["image-000.png", "image-001.png"]
    assert sorted(p.name for p in out.glob("image-*.png")) == ["image-000.png", "image-001.png"]


def test_an_adapter_folder_given_as_the_model_points_to_adapter(tmp_path, capsys):
    from tokenbooth.backbones import ADAPTER_CONFIG
    from tokenbooth.personalize.adapter import CONFIG, EMBEDS

    assert ADAPTER_CONFIG == CONFIG  # the loader knows an adapter folder by the name the adapter writer uses
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG).write_text(json.dumps({"placeholder": "[V]"}))
    (adapter / EMBEDS).write_bytes(b"")
    code, _, err = run(capsys, "generate", "a [V] cup", "--model", adapter, "--out", tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "is an adapter folder" in err and "--adapter" in err and "config.json" not in err
    assert not (tmp_path / "o").exists()


# --- --quantize: sampling on a 4- or 8-bit base ------------------------------------------------------------------

@pytest.mark.parametrize("kind,least_shared", [("int8", 0.9), ("nf4", 0.7)])
def test_a_quantized_base_draws_nearly_the_tokens_of_the_full_precision_one(tiny_model_dir, tiny_backbone, kind,
                                                                          least_shared):
    """The same seed on the same prompts: int8 keeps 98% of the tiny model's tokens, nf4 86% (a token that
    changes changes the rest of its image's context, so the shares fall with every difference)."""
    from tokenbooth.backbones import load_backbone
    from tokenbooth.backbones.quantize import is_quantized
    from tokenbooth.sampling import SamplingConfig, draw_codes

    cfg = SamplingConfig.for_family("mini", seed=3)
    quantized = load_backbone(str(tiny_model_dir), quantize=kind)
    assert all(is_quantized(layer.self_attn.q_proj.weight) for layer in quantized.decoder_layers())
    full = draw_codes(tiny_backbone, ["a red robot"] * 8, cfg)
    shared = (draw_codes(quantized, ["a red robot"] * 8, cfg) == full).float().mean().item()
    assert least_shared <= shared


def test_generate_quantize_samples_on_a_quantized_base_and_records_it(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "-n", 2, "--quantize", "nf4",
                       "--out", out)
    assert code == 0, err
    meta = _sidecar(out)
    assert meta["quantize"] == "nf4" and len(meta["images"]) == 2


def test_quantize_without_torchao_is_one_line_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import sys

    import tokenbooth.commands.generate as generate

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code, _, err = run(capsys, "generate", "a cup", "--model", tiny_model_dir, "--quantize", "int8",
                       "--out", tmp_path / "o")
    assert code != 0 and "--quantize int8 needs torchao" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_adapter_of_full_layer_tensors_is_refused_on_a_quantized_base(tiny_model_dir, tmp_path, capsys):
    """Its Q/K/V tensors differ from the base's by less than a 4-bit step: quantized, they would be the base's
    again. (LoRA adapters go on a quantized base unmerged: tests/test_quantized_sampling.py.)"""
    from tokenbooth.personalize.adapter import CONFIG, EMBEDS, LAYERS

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in (CONFIG, EMBEDS):
        (adapter / name).write_text("{}")
    (adapter / LAYERS).write_bytes(b"")
    code, _, err = run(capsys, "generate", "a [V] cup", "--model", tiny_model_dir, "--adapter", adapter,
                       "--quantize", "nf4", "--out", tmp_path / "o")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "less than a quantization step" in err and "--quantize none" in err
    assert not (tmp_path / "o").exists()


def test_an_embedding_only_adapter_samples_on_the_quantized_base_it_trained_on_and_says_so(tiny_model_dir, tmp_path,
                                                                                         capsys):
    from helpers import subject_images

    adapter = tmp_path / "adapter"
    code, _, err = run(capsys, "train", "--model", tiny_model_dir, "--images", subject_images(tmp_path / "refs"),
                       "--class-name", "robot", "--output", adapter, "--stages", "embedding", "--stage1-steps", 2,
                       "--batch-size", 2, "--quantize", "int8")
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a [V] robot", "--model", tiny_model_dir, "--adapter", adapter, "-n", 1,
                       "--out", tmp_path / "default")
    assert code == 0 and "sampling on a base quantized to int8" in err
    assert _sidecar(tmp_path / "default")["quantize"] == "int8"
    code, _, err = run(capsys, "generate", "a [V] robot", "--model", tiny_model_dir, "--adapter", adapter, "-n", 1,
                       "--quantize", "none", "--out", tmp_path / "full")
    assert code == 0 and "quantized" not in err and _sidecar(tmp_path / "full")["quantize"] == "none"
