import random

from tokenbooth.toyworld import (
    BACKGROUNDS, CLASSES, HELD_OUT_COMBOS, RESERVED, caption, pretraining_scene, random_scene, render,
    reserved_instances,
)
from tokenbooth.toyworld.checker import read_scene


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


def test_checker_reads_background_color_and_position_back_from_renders():
    n, hits = 300, {"background": 0, "color": 0, "position": 0}
    for i in range(n):
        scene = random_scene(random.Random(10**6 + i), allow_held_out=True)
        reading = read_scene(render(scene))
        hits["background"] += reading.background == scene.background
        hits["color"] += reading.color == scene.instance.color
        hits["position"] += reading.position == scene.position
    assert hits["background"] / n > 0.97
    assert hits["position"] / n > 0.95
    assert hits["color"] / n > 0.8


def test_checker_disagrees_with_a_wrong_caption():
    scene = pretraining_scene(3)
    reading = read_scene(render(scene))
    other = next(b for b in BACKGROUNDS if b != scene.background)
    assert reading.background != other
