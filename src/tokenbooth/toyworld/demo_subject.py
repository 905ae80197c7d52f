"""The subject `tokenbooth demo` teaches mini: a reserved toyworld robot (never in mini's pretraining),
as five reference pictures shipped in the package, like a user's photos of their own robot.

Re-create the pictures with: python -m tokenbooth.toyworld.demo_subject
"""

from pathlib import Path

from ..assets import DEMO_SUBJECT_DIR
from . import Scene, render, reserved_instance

SUBJECT = reserved_instance("robot-brown-purple-plain-p2v2")  # purple head, two antennae, wide brown body
CLASS_NAME = "robot"
FOLDER = DEMO_SUBJECT_DIR
# (background, position) of each reference: a few contexts, as users photograph a subject
REFERENCE_SHOTS = (("white", "center"), ("wood", "left"), ("grass", "center"), ("brick", "right"), ("pink", "center"))


def write_reference_images(folder: Path = FOLDER, size: int = 64) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (background, position) in enumerate(REFERENCE_SHOTS):
        render(Scene(SUBJECT, background, position, "large", None, seed=1000 + i), size).save(folder / f"{i}.png")


if __name__ == "__main__":
    write_reference_images()
