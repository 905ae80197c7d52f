"""toyworld: a procedural world of captioned scenes, the only data mini can learn from."""

from .render import render, render_background
from .world import (
    BACKGROUNDS, CLASSES, COLORS, DEV_SUBJECTS, HELD_OUT_COMBOS, POSITIONS, RESERVED, TEST_SUBJECTS, Instance, Scene,
    caption, describe, pretraining_scene, random_instance, random_scene, reserved_instance, reserved_instances,
)
