"""Two toy-bench runs compared, paired (eval/toybench/compare.py), on run folders written as toy-bench writes
their per-image scores."""

import json

import pytest

from tokenbooth.errors import UserError
from tokenbooth.eval.toybench import compare


def _run(folder, shift=0.0, prompts=("a [V] on the beach", "a [V] in the snow", "a red [V]")):
    for s, subject in enumerate(("cup-a", "cat-b", "car-c")):
        scores = folder / "subjects" / subject / "scores"
        scores.mkdir(parents=True)
        for row in ("base", "two-stage-qkv", "references", "oracle"):
            images = [{"dino": 0.5 + 0.1 * s + 0.01 * i + (shift if row == "two-stage-qkv" else 0.0),
                       "clip_i": 0.2, "clip_t": 0.7, "identity": 0.4, "identity_all": 0.0, "prompt": 1.0,
                       "clip_t_text": text} for i, text in enumerate(prompts)]
            (scores / f"{row}.json").write_text(json.dumps({"encoders": {}, "images": images}))
    return folder


def test_a_run_against_itself_differs_by_nothing_and_a_shifted_one_by_its_shift(tmp_path):
    a = compare.per_image_scores(_run(tmp_path / "a"))
    b = compare.per_image_scores(_run(tmp_path / "b", shift=0.05))
    same = compare.paired(a, a)
    assert set(same["rows"]) == {"base", "two-stage-qkv"}  # the references and the oracle are not methods
    assert same["rows"]["two-stage-qkv"]["dino"]["difference"] == {"mean": 0.0, "ci": [0.0, 0.0]}
    moved = compare.paired(b, a, rows=["two-stage-qkv"])["rows"]["two-stage-qkv"]["dino"]
    assert moved["difference"]["mean"] == pytest.approx(0.05)
    assert moved["difference"]["ci"] == pytest.approx([0.05, 0.05])
    assert moved["a"] - moved["b"] == pytest.approx(0.05)
    assert compare.paired(b, a)["rows"]["base"]["dino"]["difference"]["mean"] == pytest.approx(0.0)
    assert "two-stage-qkv | dino | " in compare.table(compare.paired(b, a), "b", "a")


def test_runs_that_asked_different_prompts_or_are_not_runs_are_refused(tmp_path, capsys):
    a = compare.per_image_scores(_run(tmp_path / "a"))
    other = compare.per_image_scores(_run(tmp_path / "b", prompts=("a [V] at night", "a [V] in the snow", "a red [V]")))
    with pytest.raises(UserError, match="different prompts"):
        compare.paired(a, other)
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(tmp_path), str(tmp_path / "a")])
    assert "not a toy-bench run folder" in str(exit_info.value)
