"""toy-bench v2: its subjects and prompts, scores that tell a faithful picture from a wrong one, DreamBench's
aggregation with bootstrap intervals, stage 1 shared, restarts, and the command end to end on the tiny model
(tiny random encoders and reader: the figures mean nothing there, the plumbing is what is tested)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_cli

from tokenbooth.eval.reader import IDENTITY
from tokenbooth.eval.toybench import (
    METRICS, REFERENCE_SHOTS, ROWS, attribute_shares, bench_mean, bootstrap_ci, goals, prompted_scenes, prompts,
    reader_scores, reading_scores, references, subjects, summarize, worded_prompt,
)
from tokenbooth.toyworld import DEV_SUBJECTS, RESERVED, TEST_SUBJECTS
from tokenbooth.toyworld.world import WEARS_ACCESSORIES

# --- subjects, references, prompts -------------------------------------------------------------------


def test_the_test_split_is_the_default_and_dev_is_the_other_reserved_subjects():
    test, dev = subjects(), subjects("dev")
    assert test == list(TEST_SUBJECTS) and len(test) == 12 and len({s.cls for s in test}) == 12
    assert dev == list(DEV_SUBJECTS) and len(dev) == 24 and not set(test) & set(dev)
    assert all(s in RESERVED for s in test + dev)
    assert subjects("test", 3) == test[:3]


def test_a_subject_count_past_the_split_is_refused():
    from tokenbooth.errors import UserError

    with pytest.raises(UserError, match="--subjects"):
        subjects("test", 13)
    with pytest.raises(UserError, match="--split"):
        subjects("val")


def test_twelve_prompts_per_subject_in_dreambenchs_proportions_the_same_every_time():
    for inst in subjects() + subjects("dev"):
        asked = prompts(inst)
        kinds = [p["kind"] for p in asked]
        assert len(asked) == 12 and all(f"[V] {inst.cls}" in p["text"] for p in asked)
        wears = inst.cls in WEARS_ACCESSORIES
        assert kinds.count("context") == (8 if wears else 10) and kinds.count("color") == 2
        assert kinds.count("accessory") == (2 if wears else 0)
        for p in asked:
            assert p["asks"]["background"] not in {bg for bg, _ in REFERENCE_SHOTS}  # a context no reference shows
            if p["kind"] == "color":
                assert p["asks"]["color"] not in (inst.color, inst.accent) and p["asks"]["color"] in p["text"]
            if p["kind"] == "accessory":
                assert p["asks"]["accessory"] in p["text"]
        assert len({p["text"] for p in asked}) == 12
        assert prompts(inst) == asked


def test_references_are_four_64_px_renders_in_different_contexts():
    refs = references(subjects()[0])
    assert len(refs) == 4 and all(im.size == (64, 64) for im in refs)
    assert len({im.tobytes() for im in refs}) == 4 and len({bg for bg, _ in REFERENCE_SHOTS}) == 4


# --- scores ---------------------------------------------------------------------------------------------


def faithful_reading(inst, asks: dict | None) -> dict:
    """What a perfect reader reads in a perfect picture of `inst` answering `asks`."""
    reading = {a: getattr(inst, a) for a in ("cls", "color", "accent", "pattern", "proportion", "variant")}
    reading.update(background="white", position="center", size="large", accessory="none")
    return {**reading, **(asks or {})}


class StubReader:
    """Reads back whatever it was given, in order: the scoring logic without a trained model."""

    def __init__(self, readings):
        self.readings = readings

    def read(self, images):
        assert len(images) == len(self.readings)
        return self.readings


def figures(score: dict) -> dict:
    return {k: v for k, v in score.items() if k != "attributes"}


def test_identity_and_prompt_scores_reward_a_faithful_picture_and_punish_a_wrong_one():
    inst, sibling = subjects()[0], next(s for s in RESERVED if s.cls == subjects()[0].cls and s != subjects()[0])
    asks = [p["asks"] for p in prompts(inst)]
    faithful = reader_scores(StubReader([faithful_reading(inst, a) for a in asks]), [None] * 12, inst, asks)
    assert all(figures(s) == {"identity": 1.0, "identity_all": 1.0, "prompt": 1.0} for s in faithful)
    # the sibling, on a reference's background, without the asked accessory: identity and prompt both fall
    wrong = reader_scores(StubReader([faithful_reading(sibling, None) for _ in asks]), [None] * 12, inst, asks)
    assert all(s["identity"] < 1 and s["identity_all"] == 0 and s["prompt"] < 1 for s in wrong)
    one_off = reading_scores({**faithful_reading(inst, asks[0]), "variant": (inst.variant + 1) % 3}, inst, asks[0])
    assert figures(one_off) == {"identity": 5 / 6, "identity_all": 0.0, "prompt": 1.0}
    assert one_off["attributes"] == {a: a != "variant" for a in IDENTITY}  # which one it missed


def test_a_color_prompt_takes_the_body_color_out_of_identity():
    inst = subjects()[0]
    recolor = next(p["asks"] for p in prompts(inst) if p["kind"] == "color")
    obeyed = reading_scores(faithful_reading(inst, recolor), inst, recolor)
    assert figures(obeyed) == {"identity": 1.0, "identity_all": 1.0, "prompt": 1.0}
    assert "color" not in obeyed["attributes"] and len(obeyed["attributes"]) == len(IDENTITY) - 1
    ignored = reading_scores(faithful_reading(inst, {"background": recolor["background"]}), inst, recolor)
    assert figures(ignored) == {"identity": 1.0, "identity_all": 1.0, "prompt": 0.5}  # the old color: the prompt half missed


def test_a_reference_is_scored_for_identity_and_answers_no_prompt():
    inst = subjects()[0]
    assert figures(reading_scores(faithful_reading(inst, None), inst, None)) == {"identity": 1.0, "identity_all": 1.0,
                                                                                 "prompt": None}


def test_the_oracle_renders_each_prompt_with_the_subject_itself():
    from tokenbooth.toyworld import render

    for inst in (subjects()[0], next(s for s in subjects() if s.cls in WEARS_ACCESSORIES)):
        scenes = prompted_scenes(inst)
        assert len(scenes) == 12 and len({render(s, 64).tobytes() for s in scenes}) == 12
        for scene, p in zip(scenes, prompts(inst)):
            asks = p["asks"]
            assert scene.background == asks["background"] and scene.accessory == asks.get("accessory")
            assert scene.instance.color == asks.get("color", inst.color)
            assert all(getattr(scene.instance, a) == getattr(inst, a) for a in IDENTITY if a != "color")


def test_the_words_line_spells_out_every_nameable_attribute_and_nothing_else():
    from tokenbooth.toyworld.world import PATTERN_WORDS

    plain = next(s for s in RESERVED if s.pattern == "plain")
    patterned = next(s for s in RESERVED if s.pattern != "plain")
    for inst in (plain, patterned):
        for p in prompts(inst):
            text = worded_prompt(p, inst)
            assert "[V]" not in text and f"{inst.cls} with {inst.accent} accents" in text
            color = p["asks"].get("color", inst.color)  # an asked color replaces the body's
            pattern = [] if inst.pattern == "plain" else [PATTERN_WORDS[inst.pattern]]  # captions never say plain
            assert text.startswith(" ".join(["a", color, *pattern, inst.cls, "with"]))
            assert text.endswith(p["text"].split(f"[V] {inst.cls}")[1])  # the rest of the prompt unchanged
    assert worded_prompt(prompts(plain)[0], plain).startswith(f"a {plain.color} {plain.cls} with")


# --- aggregation ----------------------------------------------------------------------------------------


def test_the_bench_mean_is_over_subjects_of_the_mean_over_their_images():
    assert bench_mean([[0.0, 1.0, 1.0, 1.0], [0.0]]) == 0.375  # not 0.6, the mean over all five images


def test_dreambench_and_toy_bench_aggregate_the_same_scores_to_the_same_figures():
    from tokenbooth.eval import metrics
    from tokenbooth.eval.toybench import subject_means

    rng = np.random.default_rng(2)
    per_subject = [[{"dino": float(d), "clip_i": float(c), "clip_t": None if i % 3 == 0 else float(t)}
                    for i, (d, c, t) in enumerate(rng.random((n, 3)))] for n in (12, 3, 7)]
    dreambench = metrics.aggregate([{"references": 4, "images": images} for images in per_subject], "paper")
    toy = summarize({"row": per_subject})["row"]
    keys = ["a", "b", "c"]
    for metric in ("dino", "clip_i", "clip_t"):
        assert toy[metric]["mean"] == dreambench[metric]  # one implementation: equal, not merely close
        for key, images in zip(keys, per_subject):
            assert subject_means({"row": per_subject}, keys)["row"][key][metric] == \
                metrics.aggregate([{"references": 4, "images": images}], "paper")[metric]


def test_the_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)

    def data(n_subjects, n_images):  # subjects differ, and so do a subject's images
        return [list(rng.normal(rng.normal(0.5, 0.1), 0.1, n_images)) for _ in range(n_subjects)]

    small, large = data(5, 4), data(80, 12)
    widths = []
    for values in (small, large):
        lo, hi = bootstrap_ci(values)
        assert lo < bench_mean(values) < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(small) == bootstrap_ci(small)  # a fixed seed: the same interval every time


def test_the_summary_has_every_metric_of_every_row_and_none_where_a_row_has_no_such_figure():
    image = {m: 0.5 for m in METRICS}
    reference = {**image, "clip_t": None, "prompt": None}
    rows = summarize({"references": [[reference] * 4] * 2, "base": [[image] * 12] * 2})
    assert rows["references"]["clip_t"] == {"mean": None, "ci": None} and rows["references"]["prompt"]["ci"] is None
    assert rows["base"]["prompt"] == {"mean": 0.5, "ci": [0.5, 0.5]}


def test_attribute_shares_count_each_identity_attribute_over_every_image():
    inst = subjects()[0]
    right = reading_scores(faithful_reading(inst, None), inst, None)
    wrong_variant = reading_scores({**faithful_reading(inst, None), "variant": (inst.variant + 1) % 3}, inst, None)
    shares = attribute_shares({"base": [[right, wrong_variant], [wrong_variant, wrong_variant]]})["base"]
    assert shares["variant"] == 0.25 and all(shares[a] == 1.0 for a in IDENTITY if a != "variant")


def figure(mean):
    return {"mean": mean, "ci": [mean - 0.01, mean + 0.01]}


def table(**means) -> dict:
    return {row: {m: figure(v) for m in METRICS} for row, v in means.items()}


def test_the_goals_say_met_only_where_the_figures_reach_them():
    rows = table(references=1.0, base=0.5, embedding=0.6, joint=0.7)
    rows["two-stage-qkv"] = {m: figure(0.91) for m in METRICS}
    rows["two-stage-qkv"]["clip_t"] = figure(0.46)  # 92% of base's 0.5: more than 5% lost
    gap = {"two-stage-qkv - embedding": {"dino": {"mean": 0.31, "ci": [0.02, 0.5]}}}
    met = {name: g["met"] for name, g in goals(rows, gap).items()}
    assert met == {"fidelity, share of the references' ceiling": True,
                   "fidelity above embedding only (paired interval's low end)": True,
                   "joint below two-stage (toyDINO margin)": True,
                   "toyCLIP-T kept, share of base": False, "prompt kept, share of base": True}
    straddling = {"two-stage-qkv - embedding": {"dino": {"mean": 0.31, "ci": [-0.01, 0.5]}}}
    assert not goals(rows, straddling)["fidelity above embedding only (paired interval's low end)"]["met"]
    assert goals(table(references=1.0, base=0.5), {}) == {}  # no Q/K/V row run: no goal to judge


# --- the command on the tiny model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dino_and_reader(tmp_path_factory):
    """A tiny random ViT (for --dino) and a tiny random attribute reader (for --reader): paths."""
    from transformers import ViTConfig, ViTModel

    from tokenbooth.eval.reader import AttributeReader, ReaderConfig, save_reader

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    save_reader(AttributeReader(ReaderConfig(width=8)), root / "reader")
    return {"dino": root / "dino", "reader": root / "reader"}


STEPS = {"stage1": 2, "stage2": 1}


def bench_args(model, dino_and_reader, out, *extra):
    return ["eval", "toybench", "--model", model, "--subjects", "1", "--stage1-steps", STEPS["stage1"],
            "--stage2-steps", STEPS["stage2"], "--dino", dino_and_reader["dino"], "--reader", dino_and_reader["reader"],
            "--output", out, *extra]


def cli(*argv) -> int:
    from tokenbooth.cli import main

    return main([str(a) for a in argv])


def subject_batches(monkeypatch, interrupt_at: int | None = None) -> list:
    """Records every training batch of the subject (not prior preservation's class batches); Ctrl-C
    (KeyboardInterrupt) when drawing subject batch number `interrupt_at`."""
    import tokenbooth.personalize.recipe as recipe

    calls, real = [], recipe.make_batch

    def counted(*args, subject, **kwargs):
        if subject:
            calls.append(1)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
        return real(*args, subject=subject, **kwargs)

    monkeypatch.setattr(recipe, "make_batch", counted)
    return calls


def short_words(monkeypatch):
    """The words line's prompts with the accent phrase left out: the full ones overflow the tiny model's
    160-token context (its tokenizer has 40 merges), and the line's plumbing is what is tested here."""
    import tokenbooth.eval.toybench.tasks as tasks

    real = tasks.worded_prompt
    monkeypatch.setattr(tasks, "worded_prompt",
                        lambda asked, inst: real(asked, inst).replace(f" with {inst.accent} accents", ""))


def test_the_words_line_is_left_out_where_its_prompts_do_not_fit_the_context(tiny_backbone):
    from tokenbooth.backbones import load_backbone
    from tokenbooth.eval.toybench import words_fit

    assert not words_fit(tiny_backbone, subjects())
    assert words_fit(load_backbone("mini"), subjects() + subjects("dev"))


@pytest.fixture(scope="module")
def bench(tiny_model_dir, dino_and_reader, tmp_path_factory):
    """One uninterrupted run, with the training runs it started and the subject batches they drew."""
    import tokenbooth.personalize as personalize

    out = tmp_path_factory.mktemp("toybench") / "run"
    trainings, real_train = [], personalize.train

    def spy(backbone, images, cfg, folder, **kwargs):
        trainings.append((folder.name, cfg.stages, kwargs.get("stage1_from")))
        return real_train(backbone, images, cfg, folder, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(personalize, "train", spy)
        short_words(mp)
        batches = subject_batches(mp)
        assert cli(*bench_args(tiny_model_dir, dino_and_reader, out)) == 0
    return {"out": out, "results": json.loads((out / "results.json").read_text()), "trainings": trainings,
            "batches": len(batches)}


def test_the_command_writes_results_json_with_every_row_and_metric_report_grid_and_plot(bench):
    results, out = bench["results"], bench["out"]
    assert {"rows", "subjects", "minutes"} <= results.keys() and isinstance(results["minutes"], float)
    assert list(results["rows"]) == list(ROWS) and results["subjects"] == [subjects()[0].key]
    for row, figures in results["rows"].items():
        assert list(figures) == list(METRICS)
        for metric, figure in figures.items():
            assert figure.keys() == {"mean", "ci"}
            if row == "references" and metric in ("clip_t", "prompt"):
                assert figure == {"mean": None, "ci": None}
            else:
                lo, hi = figure["ci"]
                assert lo <= figure["mean"] + 1e-9 and figure["mean"] <= hi + 1e-9
    assert list(results["oracle"]) == list(METRICS)  # scored like a row, kept out of "rows"
    assert list(results["words"]) == list(METRICS)
    assert len(list((out / "subjects" / subjects()[0].key / "images" / "words").glob("*.png"))) == 12
    assert list(results["identity_by_attribute"]) == [*ROWS, "words", "oracle"]
    assert all(list(shares) == list(IDENTITY) for shares in results["identity_by_attribute"].values())
    assert results["goals"] and all(g.keys() == {"value", "target", "met"} for g in results["goals"].values())
    report = (out / "report.md").read_text()
    assert all(row in report for row in ("Q/K/V", "LoRA", "prior", "ceiling", "floor", "words", "oracle", "Goals"))
    assert f"except --stage1-steps {STEPS['stage1']}, --stage2-steps {STEPS['stage2']};" in report  # what was changed
    assert (out / "report.png").is_file() and (out / "grids" / f"{subjects()[0].key}.png").is_file()


def test_paired_differences_are_the_difference_of_the_rows_with_their_own_interval(bench):
    results = bench["results"]
    for pair in ("two-stage-qkv - embedding", "two-stage-qkv - joint", "two-stage-lora - embedding"):
        a, b = pair.split(" - ")
        for metric in ("dino", "clip_i"):
            figure = results["differences"][pair][metric]
            assert figure["mean"] == pytest.approx(results["rows"][a][metric]["mean"] - results["rows"][b][metric]["mean"])
            lo, hi = figure["ci"]
            assert lo <= figure["mean"] + 1e-9 <= hi + 2e-9
    assert "Paired differences" in (bench["out"] / "report.md").read_text()


def test_stage_1_is_trained_once_per_subject_and_every_two_stage_row_continues_from_it(bench):
    stage1 = [t for t in bench["trainings"] if t[0] == "embedding"]
    assert len(stage1) == 1 and stage1[0][1] == "embedding"
    branched = {name: start for name, stages, start in bench["trainings"] if stages == "two-stage"}
    assert set(branched) == {"two-stage-qkv", "two-stage-lora", "two-stage-prior"}
    assert all(start is not None and start.name == "embedding" for start in branched.values())
    s1, s2 = STEPS["stage1"], STEPS["stage2"]
    assert bench["batches"] == s1 + (s1 + s2) + 3 * s2  # stage 1 once, joint, then three stage 2s alone


def test_a_restart_reuses_every_finished_adapter_image_and_score(bench, tiny_model_dir, dino_and_reader, monkeypatch):
    import tokenbooth.eval.toybench.run as toybench_run
    import tokenbooth.personalize as personalize
    import tokenbooth.sampling as sampling

    def refuse(*args, **kwargs):
        raise AssertionError("finished work done again")

    monkeypatch.setattr(personalize, "train", refuse)
    monkeypatch.setattr(sampling, "draw", refuse)
    monkeypatch.setattr(toybench_run, "reader_scores", refuse)
    short_words(monkeypatch)
    assert cli(*bench_args(tiny_model_dir, dino_and_reader, bench["out"])) == 0
    again = json.loads((bench["out"] / "results.json").read_text())
    assert again["rows"] == bench["results"]["rows"] and again["per_subject"] == bench["results"]["per_subject"]
    assert again["words"] == bench["results"]["words"] and again["oracle"] == bench["results"]["oracle"]


def test_a_run_killed_halfway_and_restarted_gives_the_uninterrupted_results(bench, tiny_model_dir, dino_and_reader,
                                                                           tmp_path, monkeypatch):
    out = tmp_path / "run"
    s1, s2 = STEPS["stage1"], STEPS["stage2"]
    subject_batches(monkeypatch, interrupt_at=s1 + (s1 + s2) + s2 + 1)  # inside two-stage-lora's stage 2
    assert cli(*bench_args(tiny_model_dir, dino_and_reader, out)) == 130
    lora = out / "subjects" / subjects()[0].key / "adapters" / "two-stage-lora"
    assert not (lora / "adapter_config.json").exists() and (lora / "checkpoints" / f"step-{s1}").is_dir()
    assert not (out / "results.json").exists()
    batches = subject_batches(monkeypatch)
    assert cli(*bench_args(tiny_model_dir, dino_and_reader, out)) == 0
    assert len(batches) == 2 * s2  # the LoRA row's stage 2 and the prior row's: nothing finished is redone
    results = json.loads((out / "results.json").read_text())
    assert results["rows"] == bench["results"]["rows"] and results["per_subject"] == bench["results"]["per_subject"]


def test_a_restart_with_other_settings_is_refused(bench, tiny_model_dir, dino_and_reader, capsys):
    before = sorted(p for p in bench["out"].rglob("*"))
    code, _, err = run_cli(capsys, *bench_args(tiny_model_dir, dino_and_reader, bench["out"], "--seed", "1"))
    assert code != 0 and "other settings" in err and err.count("tokenbooth: error:") == 1
    assert sorted(p for p in bench["out"].rglob("*")) == before


@pytest.mark.parametrize("asset,script,flag", [("TOYDINO_DIR", "toydino", "--dino"),
                                               ("READER_DIR", "reader", "--reader")])
def test_a_missing_bundled_encoder_is_named_with_the_command_that_makes_it(tiny_model_dir, dino_and_reader, tmp_path,
                                                                           capsys, monkeypatch, asset, script, flag):
    import tokenbooth.assets as assets

    monkeypatch.setattr(assets, asset, tmp_path / "not-made-yet")
    given = [a for a in ("--dino", "--reader") if a != flag]
    args = ["eval", "toybench", "--model", tiny_model_dir, "--output", tmp_path / "out",
            *[x for a in given for x in (a, dino_and_reader[a[2:]])]]
    code, _, err = run_cli(capsys, *args)
    assert code != 0 and f"python -m tokenbooth.pretrain.{script}" in err and err.count("tokenbooth: error:") == 1
    assert not (tmp_path / "out").exists()


def test_bad_subject_count(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "toybench", "--subjects", "0", "--output", tmp_path)
    assert code != 0 and "--subjects" in err


def test_rows_picks_a_subset_for_tuning_and_keeps_the_references(tiny_model_dir, dino_and_reader, tmp_path,
                                                                 monkeypatch):
    batches = subject_batches(monkeypatch)
    out = tmp_path / "run"
    assert cli(*bench_args(tiny_model_dir, dino_and_reader, out, "--rows", "two-stage-qkv,embedding")) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["references", "embedding", "two-stage-qkv"]
    assert len(batches) == STEPS["stage1"] + STEPS["stage2"]  # no joint, LoRA or prior training
    assert sorted(p.name for p in (out / "subjects" / subjects()[0].key / "images").iterdir()) == \
        ["embedding", "two-stage-qkv"]


def test_validation_steps_log_fidelity_along_each_run_and_the_report_tabulates_it(tiny_model_dir, dino_and_reader,
                                                                                  tmp_path):
    out = tmp_path / "run"
    assert cli(*bench_args(tiny_model_dir, dino_and_reader, out, "--rows", "embedding,two-stage-qkv",
                           "--validation-steps", "1")) == 0
    along = json.loads((out / "results.json").read_text())["fidelity_along_the_run"]
    # stage 1 takes 2 steps, stage 2 one: the two-stage row carries the stage 1 it continued from
    assert {row: sorted(map(int, points)) for row, points in along.items()} == \
        {"embedding": [1, 2], "two-stage-qkv": [1, 2, 3]}
    assert along["embedding"]["1"] == along["two-stage-qkv"]["1"]
    assert "Fidelity along the run" in (out / "report.md").read_text()


def test_an_unknown_row_is_refused_before_anything_is_written(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", "toybench", "--rows", "embedding,dreambooth", "--output", tmp_path / "o")
    assert code != 0 and "--rows" in err and "dreambooth" in err and not (tmp_path / "o").exists()
