"""toy-bench's design: held-out subjects, DreamBench-like prompts, and scores that can tell good from bad."""

from conftest import run_cli as run

from tokenbooth.eval.toybench import checker_scores, prompts, references, subjects, summarize
from tokenbooth.toyworld import RESERVED, Scene, render
from tokenbooth.toyworld.demo_subject import SUBJECT as DEMO


def test_subjects_are_reserved_never_the_demo_subject_and_span_classes():
    picked = subjects(10)
    assert len(set(picked)) == 10 and all(s in RESERVED for s in picked) and DEMO not in picked
    assert len({s.cls for s in picked}) == 10


def test_ten_prompts_of_dreambenchs_three_kinds():
    for inst in subjects(12):
        asked = prompts(inst)
        assert len(asked) == 10 and all("[V]" in p["text"] for p in asked)
        changed = [p for p in asked if not p["keeps_identity"]]
        assert len(changed) == 3 and all(p["color"] != inst.color and p["color"] in p["text"] for p in changed)
        assert len({p["background"] for p in asked}) >= 6


def test_checker_scores_reward_the_subject_and_the_prompt_and_punish_the_wrong_picture():
    inst = subjects(1)[0]
    asked = prompts(inst)
    faithful = [render(Scene(inst if p["keeps_identity"] else inst.__class__(**{**inst.__dict__, "color": p["color"]}),
                             p["background"], "center", "large", None, i)) for i, p in enumerate(asked)]
    wrong = [render(Scene(subjects(2)[1], "pink", "center", "large", None, i)) for i in range(len(asked))]
    good, bad = checker_scores(faithful, asked), checker_scores(wrong, asked)
    assert good["identity"] > 0.8 and good["prompt"] > 0.7
    assert bad["identity"] < good["identity"] and bad["prompt"] < good["prompt"]


def test_summary_averages_over_subjects():
    rows = {"base": [dict(subject="a", clip_i=0.2, clip_t=0.4, identity=0.0, prompt=1.0),
                     dict(subject="b", clip_i=0.4, clip_t=0.2, identity=1.0, prompt=0.0)]}
    assert summarize(rows) == [dict(row="base", clip_i=0.30000000000000004, clip_t=0.30000000000000004,
                                    identity=0.5, prompt=0.5)]


def test_references_differ_in_context_not_subject():
    refs = references(subjects(1)[0], 32)
    assert len(refs) == 4 and len({im.tobytes() for im in refs}) == 4


def test_bad_subject_count(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "toybench", "--subjects", "0", "--output", tmp_path)
    assert code != 0 and "--subjects" in err
