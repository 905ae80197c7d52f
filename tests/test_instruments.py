"""The instruments toy-bench measures with: the attribute reader and toyDINO. Their tiny versions are
built here in seconds; the shipped ones (assets/reader, assets/toydino) are checked when present."""

import dataclasses
import math
import random

import pytest
import torch

from tokenbooth.assets import READER_DIR, TOYDINO_DIR
from tokenbooth.errors import UserError
from tokenbooth.eval.reader import (
    CONTEXT, IDENTITY, VALUES, AttributeReader, ReaderConfig, labels, load_reader, save_reader, scene_attributes,
)
from tokenbooth.toyworld import RESERVED, pretraining_scene, render, reserved_instances


def test_the_reader_reads_every_identity_and_context_attribute():
    assert set(IDENTITY) | set(CONTEXT) == set(VALUES)
    assert set(IDENTITY) == {"cls", "color", "accent", "pattern", "proportion", "variant"}


def test_reader_labels_are_the_scenes_own_attributes():
    scenes = [pretraining_scene(i) for i in range(20)]
    y = labels(scenes)
    for i, s in enumerate(scenes):
        key = scene_attributes(s)
        assert all(VALUES[a][y[a][i]] == key[a] for a in VALUES)


def test_a_saved_reader_loads_back_and_reads_the_same(tmp_path):
    model = AttributeReader(ReaderConfig(width=8)).eval()
    save_reader(model, tmp_path)
    images = [render(pretraining_scene(i)) for i in range(4)]
    assert load_reader(tmp_path).read(images) == model.read(images)


def test_a_reader_for_another_worlds_attributes_is_refused(tmp_path):
    import json

    save_reader(AttributeReader(ReaderConfig(width=8)), tmp_path)
    config = json.loads((tmp_path / "reader.json").read_text())
    config["values"]["cls"] = config["values"]["cls"][:-1]
    (tmp_path / "reader.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="another toyworld"):
        load_reader(tmp_path)


def test_a_missing_reader_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="pretrain.reader"):
        load_reader(tmp_path)


def test_a_few_training_steps_teach_the_reader_the_background():
    from tokenbooth.pretrain import reader as recipe

    torch.manual_seed(0)
    model = AttributeReader(ReaderConfig(width=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        pixels, target = recipe.training_batch(step)
        loss = torch.nn.functional.cross_entropy(model(pixels)["background"], target["background"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    scenes = recipe.held_out_scenes(100)
    model.eval()
    read = model.read([render(s) for s in scenes])
    hits = sum(r["background"] == s.background for r, s in zip(read, scenes))
    assert hits > 40  # chance is 10 of 100


@pytest.mark.skipif(not (READER_DIR / "reader.safetensors").exists(), reason="reader not trained")
def test_the_shipped_reader_reads_reserved_subjects_it_never_saw():
    from tokenbooth.eval.reader import accuracy
    from tokenbooth.pretrain.reader import reserved_scenes

    scenes = reserved_scenes()[::5]
    result = accuracy(load_reader(), [render(s) for s in scenes], scenes)
    assert min(result.values()) > 0.85, result


# --- toyDINO ------------------------------------------------------------------------------------------

def test_toydino_twins_differ_in_one_identity_attribute_and_are_never_reserved():
    from tokenbooth.pretrain.toydino import twin

    rng = random.Random(0)
    for i in range(300):
        scene = pretraining_scene(i)
        other = twin(scene, rng)
        a, b = dataclasses.asdict(scene.instance), dataclasses.asdict(other.instance)
        assert sum(a[k] != b[k] for k in a) == 1
        assert other.instance not in RESERVED
        assert dataclasses.replace(other, instance=scene.instance) == scene


def test_the_contrastive_loss_is_lowest_when_the_two_views_agree():
    from tokenbooth.pretrain.toydino import nt_xent

    z = torch.randn(16, 8)
    assert nt_xent(z, z) < nt_xent(z, torch.randn(16, 8))


def test_toydino_loads_through_dreambenchs_dino_path_and_reports_siblings(tmp_path):
    from tokenbooth.eval.metrics import load_dino
    from tokenbooth.pretrain.toydino import RESOLUTION, build_model, sibling_report

    build_model().save_pretrained(tmp_path)
    dino = load_dino(str(tmp_path))
    assert dino.crop == RESOLUTION
    report = sibling_report(tmp_path, subjects=reserved_instances()[:2])
    assert set(report) == {"accent", "pattern", "proportion", "variant"}
    assert all(0 <= r["share"] <= 1 and r["pairs"] > 0 for r in report.values())


@pytest.mark.skipif(not (TOYDINO_DIR / "config.json").exists(), reason="toyDINO not trained")
def test_the_shipped_toydino_tells_most_reserved_subjects_from_their_single_attribute_siblings():
    from tokenbooth.pretrain.toydino import sibling_report

    report = sibling_report(TOYDINO_DIR, subjects=reserved_instances()[::3])
    assert all(r["share"] >= 0.75 for r in report.values()), report


def test_a_training_script_resumes_its_modules_and_optimizer_from_the_last_checkpoint(tmp_path):
    from tokenbooth.pretrain.mini import resume, save_checkpoint

    model, head = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=0.1)
    head(model(torch.randn(4, 3))).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "x.ckpt", model=model.state_dict(), head=head.state_dict(), opt=opt.state_dict(), step=7)
    model2, head2 = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt2 = torch.optim.Adam([*model2.parameters(), *head2.parameters()], lr=0.1)
    assert resume(tmp_path / "missing.ckpt", "test", opt2, model=model2, head=head2) == 0
    assert resume(tmp_path / "x.ckpt", "test", opt2, model=model2, head=head2) == 7
    assert torch.equal(model2.weight, model.weight) and torch.equal(head2.bias, head.bias)
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_mini_transformer_schedule_warms_up_decays_and_restarts_at_each_cycle():
    from tokenbooth.pretrain.mini import V2, WARMUP, transformer_lr

    start = 0
    for steps, peak in V2.transformer_cycles:
        assert transformer_lr(start) == pytest.approx(peak / WARMUP)  # a fresh warm-up at every cycle start
        assert transformer_lr(start + WARMUP - 1) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (WARMUP - 1) / steps)))
        assert transformer_lr(start + steps - 1) < peak * 1e-4  # decayed to about zero at the cycle's end
        assert max(transformer_lr(s) for s in range(start, start + steps)) <= peak
        start += steps
    assert start == V2.transformer_steps and transformer_lr(V2.transformer_steps) == 0.0


@pytest.mark.parametrize("argv, names", [
    (["--temperature", "0"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--sjd-window", "4"], "--sjd-window"),
])
def test_mini_quality_refuses_a_bad_sampling_flag_in_one_line_before_loading_a_model(argv, names, tmp_path, capsys):
    from tokenbooth.cli import main

    # a model that does not exist: the flag is refused first
    code = main(["eval", "mini-quality", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), *argv])
    message = capsys.readouterr().err.rstrip("\n")
    assert code != 0 and message.startswith("tokenbooth: error:") and names in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_mini_quality_as_a_module_forwards_to_the_command(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tokenbooth.eval.mini_quality", "--model", str(tmp_path / "x"),
                             "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.startswith("tokenbooth: error:") and "--temperature" in result.stderr
