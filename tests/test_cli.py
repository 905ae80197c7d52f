"""`tokenbooth generate` end to end on the tiny model, and every bad input the foundation lists."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import run_cli as run



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


def test_version_and_help():
    for flag in ("--version", "--help"):
        proc = subprocess.run([sys.executable, "-m", "tokenbooth", flag], capture_output=True, text=True)
        assert proc.returncode == 0 and "tokenbooth" in proc.stdout


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
