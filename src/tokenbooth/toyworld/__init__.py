"""toyworld: a procedural world of captioned scenes, the only data mini can learn from."""

from .render import render, render_background
from .world import (
    BACKGROUNDS, CLASSES, COLORS, HELD_OUT_COMBOS, POSITIONS, RESERVED, Instance, Scene, caption, describe,
    pretraining_scene, random_instance, random_scene, reserved_instance, reserved_instances,
)
