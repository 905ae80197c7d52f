import random

from tokenbooth.toyworld import (
    BACKGROUNDS, CLASSES, HELD_OUT_COMBOS, RESERVED, caption, pretraining_scene, render,
    reserved_instances,
)


def test_scenes_and_pixels_are_a_pure_function_of_the_seed():
    a, b = pretraining_scene(123), pretraining_scene(123)
    assert a == b
    assert render(a).tobytes() == render(b).tobytes()
    assert pretraining_scene(124) != a


def test_pretraining_never_draws_a_reserved_subject_or_a_held_out_combination():
    for i in range(20000):
        s = pretraining_scene(i)
        assert s.instance not in RESERVED
        assert (s.instance.cls, s.instance.color, s.background) not in HELD_OUT_COMBOS


def test_reserved_subjects_cover_every_class_and_differ_from_their_siblings():
    subjects = reserved_instances()
    assert {s.cls for s in subjects} == set(CLASSES)
    for cls in CLASSES:
        siblings = [s for s in subjects if s.cls == cls]
        assert len({s.key for s in siblings}) == len(siblings) >= 2


def test_the_world_has_dreambench_like_contexts():
    assert len(CLASSES) >= 12 and len(BACKGROUNDS) >= 8


def test_captions_vary_in_wording_and_name_the_drawn_background_and_object():
    rng = random.Random(0)
    scene = pretraining_scene(7)
    texts = {caption(scene, rng) for _ in range(50)}
    assert len(texts) > 5
    assert all(scene.instance.cls in t for t in texts)


def test_dev_and_test_subjects_split_the_reserved_subjects_with_one_test_subject_per_class():
    from tokenbooth.toyworld import DEV_SUBJECTS, TEST_SUBJECTS
    from tokenbooth.toyworld.world import DEMO_SUBJECT_KEY

    assert sorted(i.cls for i in TEST_SUBJECTS) == sorted(CLASSES)
    assert not set(DEV_SUBJECTS) & set(TEST_SUBJECTS)
    assert set(DEV_SUBJECTS) | set(TEST_SUBJECTS) == RESERVED
    assert DEMO_SUBJECT_KEY not in {i.key for i in TEST_SUBJECTS}
    assert sorted(i.cls for i in DEV_SUBJECTS[:12]) == sorted(CLASSES)  # a few dev subjects span the classes


def test_captions_sometimes_name_the_accent_but_never_proportions_or_parts():
    from tokenbooth.toyworld.world import Instance, Scene

    inst = Instance("robot", "red", "blue", "plain", 2, 2)
    scene = Scene(inst, "snow", "left", "large", None, 0)
    rng = random.Random(0)
    texts = [caption(scene, rng) for _ in range(400)]
    assert 0.1 < sum("blue" in t for t in texts) / len(texts) < 0.35
    words = {w for t in texts for w in t.replace(",", " ").split()}
    assert not words & {"wide", "narrow", "antenna", "antennae", "two", "2"}


def test_parts_proportions_and_accents_change_the_pixels_of_a_64px_render():
    import dataclasses

    import numpy as np

    from tokenbooth.toyworld.world import Scene

    for inst in reserved_instances():
        scene = Scene(inst, "white", "center", "large", None, 5)
        base = np.asarray(render(scene), dtype=np.int32)
        assert base.shape == (64, 64, 3)
        for attr, value in (("variant", (inst.variant + 1) % 3), ("proportion", (inst.proportion + 1) % 3),
                            ("accent", "green" if inst.accent != "green" and inst.color != "green" else "pink")):
            if attr == "accent" and value == inst.color:
                continue
            other = np.asarray(render(dataclasses.replace(scene, instance=dataclasses.replace(inst, **{attr: value}))),
                               dtype=np.int32)
            changed = (np.abs(base - other).sum(-1) > 60).sum()
            assert changed >= 12, (inst.key, attr, changed)  # at least a few pixels' worth, at 64 px
