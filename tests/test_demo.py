"""`tokenbooth demo`: the grid, and the attribute reader's verdict on each of its rows (printed and in demo.json).

The end-to-end test runs the demo on the tiny model with a few training steps; the readers here are stand-ins
whose readings are known, so the figures can be checked against them."""

from __future__ import annotations

import json

import pytest
from helpers import quick, run_cli

from tokenbooth.commands import demo as demo_command
from tokenbooth.eval import reader as reader_module
from tokenbooth.eval.demo_figures import judge_rows, verdict_lines
from tokenbooth.eval.reader import IDENTITY, VALUES
from tokenbooth.personalize import demo
from tokenbooth.toyworld import demo_subject
from tokenbooth.toyworld.world import BACKGROUND_PHRASES

SUBJECT = demo_subject.SUBJECT
ASKED = [p.asks for p in demo.PROMPTS if p.asks]


class FixedReader:
    """Reads the same attributes in every picture."""

    def __init__(self, reading: dict):
        self.reading, self.calls = reading, 0

    def read(self, images) -> list[dict]:
        self.calls += 1
        return [dict(self.reading) for _ in images]


def the_subject_on(background: str) -> FixedReader:
    """Reads every picture as the demo subject itself (its toyworld instance's attributes) on `background`."""
    return FixedReader({**{a: getattr(SUBJECT, a) for a in IDENTITY}, "background": background,
                        "position": "center", "size": "large", "accessory": "none"})


def nothing_right() -> FixedReader:
    """Reads in every picture a value that is neither the subject's nor any a prompt asks for."""
    own = {a: getattr(SUBJECT, a, None) for a in VALUES}
    return FixedReader({a: next(v for v in values if v != own[a] and all(asks.get(a) != v for asks in ASKED))
                        for a, values in VALUES.items()})


def grid_rows(n: int = 2) -> list[tuple[str, list]]:
    """The demo's rows as make_demo hands them to the judge (the pictures do not matter to a stand-in)."""
    return [(demo.REFERENCES_LABEL, [None] * n)] + [(p.label, [None] * n) for p in demo.PROMPTS]


def test_a_reader_that_reads_the_subject_right_gives_every_identity_figure_one():
    judged = judge_rows(the_subject_on("beach"), SUBJECT, demo.judged_rows(grid_rows()))
    assert [r["label"] for r in judged["rows"]] == [demo.REFERENCES_LABEL, *(p.label for p in demo.PROMPTS)]
    assert [r["kind"] for r in judged["rows"]] == ["references", "base", *["personalized"] * 5]
    assert judged["subject"] == {a: getattr(SUBJECT, a) for a in IDENTITY}
    for row in judged["rows"]:
        assert row["identity_all"] == {"right": 2, "of": 2, "share": 1.0} and row["identity"] == 1.0
        # the red row asks for another body color: the subject's own is not counted there
        assert set(row["attributes"]) == set(IDENTITY) - set(row["asks"] or {})
        # the background is read right only where the prompt asks for the beach
        if row["asks"]:
            assert row["asked"]["background"]["share"] == float(row["asks"]["background"] == "beach")
    together = judged["overall"]["personalized"]
    assert together["images"] == 10 and together["identity_all"]["share"] == 1.0
    assert together["asked"]["background"] == {"right": 2, "of": 10, "share": 0.2}
    assert together["attributes"]["color"]["of"] == 8  # the red row's two cells left out
    assert together["asked"]["color"] == {"right": 0, "of": 2, "share": 0.0}


def test_a_reader_that_reads_nothing_right_gives_every_figure_zero():
    judged = judge_rows(nothing_right(), SUBJECT, demo.judged_rows(grid_rows()))
    for figures in [*judged["rows"], *judged["overall"].values()]:
        assert figures["identity_all"]["share"] == 0.0 and figures["identity"] == 0.0
        assert all(c["share"] == 0.0 for c in [*figures["attributes"].values(), *figures["asked"].values()])


def test_every_prompt_asks_for_what_its_words_say():
    for prompt in demo.PROMPTS:
        for attribute, value in (prompt.asks or {}).items():
            word = BACKGROUND_PHRASES[value][0] if attribute == "background" else value
            assert word in prompt.text, (prompt.text, attribute, value)


def test_one_verdict_line_per_grid_row_and_one_for_the_personalized_cells():
    judged = judge_rows(the_subject_on("snow"), SUBJECT, demo.judged_rows(grid_rows()))
    lines = verdict_lines(judged)
    assert len(lines) == 1 + len(demo.PROMPTS) + 1 + 1  # heading, references, prompts, together
    assert "[V] robot in the snow" in lines[4] and "asked background snow 2/2" in lines[4]
    assert "all identity right 2/2" in lines[1] and "parts 2/2" in lines[1]
    assert "asked background 2/10" in lines[-1]


@pytest.fixture
def tiny_demo(monkeypatch, tiny_model_dir):
    """`tokenbooth demo` on the tiny model, with a few training steps."""
    class QuickTraining:
        @staticmethod
        def for_family(family, **overrides):
            return quick("model", **overrides)

    monkeypatch.setattr(demo, "MODEL", str(tiny_model_dir))
    monkeypatch.setattr(demo, "TrainConfig", QuickTraining)


def test_demo_prints_the_readers_verdict_and_writes_it_to_demo_json_without_changing_the_grid(
        tiny_demo, monkeypatch, capsys, tmp_path):
    reader = the_subject_on("night")
    monkeypatch.setattr(demo_command, "load_reader", lambda: reader)
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path / "judged")
    assert code == 0, err
    assert reader.calls == 1 + len(demo.PROMPTS)  # every row of the grid read
    printed = out[out.index("the attribute reader's verdict"):].splitlines()
    assert [line.split("  all identity")[0].strip() for line in printed[1:8]] == \
        [demo.REFERENCES_LABEL, *(p.label for p in demo.PROMPTS)]
    saved = json.loads((tmp_path / "judged" / "demo.json").read_text())
    assert {"subject", "prompts", "seed", "sampling", "training", "train_seconds", "total_seconds",
            "reader"} <= set(saved)
    assert saved["training"]["stage1_steps"] == 3
    figures = saved["reader"]
    assert [r["images"] for r in figures["rows"]] == [5] + [demo.IMAGES_PER_ROW] * len(demo.PROMPTS)
    assert all(r["identity_all"]["share"] == 1.0 for r in figures["rows"])
    assert figures["rows"][3]["readings"][0]["background"] == "night"
    assert figures["overall"]["personalized"]["asked"]["background"]["share"] == 1 / 5  # the night row alone

    # without a judge the same grid, pixel for pixel: reading happens after drawing
    demo.make_demo(tmp_path / "plain")
    assert (tmp_path / "plain" / "demo.png").read_bytes() == (tmp_path / "judged" / "demo.png").read_bytes()
    assert "reader" not in json.loads((tmp_path / "plain" / "demo.json").read_text())


def test_demo_without_a_reader_stops_before_training_with_one_line(tiny_demo, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(reader_module.assets, "READER_DIR", tmp_path / "no-reader")
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "demo")
    assert code != 0 and "no attribute reader" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "demo").exists()
