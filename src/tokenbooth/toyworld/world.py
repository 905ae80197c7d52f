"""What exists in the toy world: object classes, their instances, scenes and captions.

Everything is a pure function of a seed, so a scene can be re-drawn from the few numbers kept beside it.
The world is built for the paper's experiment:
- a class word ("robot") does not fix the look: every instance has its own colors, pattern, proportions
  and parts, so one instance has an identity that 3-5 pictures can teach and that sets it apart from its
  siblings;
- contexts mirror DreamBench's prompt kinds: recontextualisation (backgrounds), property changes
  ("a red robot"), accessories ("wearing a hat");
- a reserved set of instances is never drawn into pretraining data: they are the subjects personalization
  learns, so mini has truly never seen them.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

CLASSES = (
    "robot", "teddy", "cup", "ball", "flower", "house",
    "car", "duck", "vase", "cat", "fish", "backpack",
)
# Classes that can wear things; the rest would look absurd with a scarf.
WEARS_ACCESSORIES = ("robot", "teddy", "duck", "cat")
ACCESSORIES = ("hat", "scarf")

# name -> RGB. Kept far apart in color space so they read back from small images.
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 150, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (120, 70, 30),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")
PATTERN_WORDS = {"plain": "plain", "striped": "striped", "dotted": "spotted", "checkered": "checkered"}
BACKGROUNDS = ("beach", "snow", "grass", "night", "wood", "brick", "water", "forest", "white", "pink")
BACKGROUND_PHRASES = {
    "beach": ("on the beach", "on a sandy beach", "by the sea"),
    "snow": ("in the snow", "on a snowy field", "in the winter snow"),
    "grass": ("on the grass", "in a green meadow", "on a lawn"),
    "night": ("under a starry night sky", "at night", "under the stars"),
    "wood": ("on a wooden floor", "on wooden planks", "on a wood floor"),
    "brick": ("in front of a brick wall", "against a red brick wall", "by a brick wall"),
    "water": ("floating on the water", "on the water", "in a blue lake"),
    "forest": ("in the forest", "among the trees", "in a dark forest"),
    "white": ("on a white background", "on plain white", "in a white studio"),
    "pink": ("on a pink background", "on plain pink", "in front of a pink wall"),
}
POSITIONS = ("left", "center", "right")
POSITION_PHRASES = {"left": "on the left", "center": "in the middle", "right": "on the right"}
SIZES = ("small", "large")

# Held-out (class, color, background) combinations: pretraining never draws them, so prompt adherence on
# them measures composition rather than memory.
HELD_OUT_COMBOS = frozenset({
    ("robot", "green", "snow"), ("teddy", "blue", "beach"), ("cup", "red", "grass"),
    ("ball", "yellow", "night"), ("flower", "purple", "water"), ("house", "pink", "forest"),
    ("car", "orange", "brick"), ("duck", "white", "wood"), ("vase", "black", "beach"),
    ("cat", "orange", "snow"), ("fish", "red", "white"), ("backpack", "green", "pink"),
    ("robot", "red", "water"), ("teddy", "brown", "night"), ("car", "blue", "snow"),
    ("ball", "purple", "grass"),
})


@dataclass(frozen=True)
class Instance:
    """One specific object: what a user's photos of "my dog" pin down and the class word does not."""

    cls: str
    color: str  # the dominant body color, the one a caption names
    accent: str  # second color: trims, wheels, roof, petals' center...
    pattern: str
    proportion: int  # 0 narrow, 1 regular, 2 wide: no caption word names it
    variant: int  # 0..2: which parts it has (antennae, handle side, ears...): no caption word names them

    @property
    def key(self) -> str:
        return f"{self.cls}-{self.color}-{self.accent}-{self.pattern}-p{self.proportion}v{self.variant}"


@dataclass(frozen=True)
class Scene:
    instance: Instance
    background: str
    position: str
    size: str
    accessory: str | None
    seed: int  # drives the background's texture and small jitters

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(**{**d, "instance": Instance(**d["instance"])})


def reserved_instances() -> tuple[Instance, ...]:
    """The subjects that pretraining never sees, three per class, fixed forever (changing them would leak
    them into a retrained mini). Siblings of the same class differ in several attributes at once."""
    rng = random.Random(20250101)
    out = []
    for cls in CLASSES:
        for _ in range(3):
            color, accent = rng.sample(list(COLORS), 2)
            out.append(Instance(cls, color, accent, rng.choice(PATTERNS), rng.randrange(3), rng.randrange(3)))
    return tuple(out)


RESERVED = frozenset(reserved_instances())
DEMO_SUBJECT_KEY = "robot-brown-purple-plain-p2v2"  # `tokenbooth demo`'s robot


def _test_subjects() -> tuple[Instance, ...]:
    """The subjects results are reported on, never tuned on: per class, the first reserved sibling (the
    demo's robot excepted, since the demo is looked at while tuning). 12 subjects, one per class."""
    out = []
    for cls in CLASSES:
        out.append(next(i for i in reserved_instances() if i.cls == cls and i.key != DEMO_SUBJECT_KEY))
    return tuple(out)


TEST_SUBJECTS = _test_subjects()
# The subjects mini's recipe and sampling defaults are tuned on: every reserved subject not in the test set
# (24, the demo's robot among them), ordered one per class and then the second of each class, so that the
# first N of them (`--subjects N`) span as many classes as they can.
_DEV = [i for i in reserved_instances() if i not in TEST_SUBJECTS]
DEV_SUBJECTS = tuple(sorted(_DEV, key=lambda i: [j for j in _DEV if j.cls == i.cls].index(i)))


def reserved_instance(key: str) -> Instance:
    for inst in reserved_instances():
        if inst.key == key:
            return inst
    raise KeyError(f"no reserved toyworld instance named {key!r}")


def random_instance(rng: random.Random, cls: str | None = None, color: str | None = None) -> Instance:
    """A fresh instance for pretraining: never one of the reserved subjects."""
    while True:
        c = color or rng.choice(list(COLORS))
        accent = rng.choice([a for a in COLORS if a != c])
        inst = Instance(cls or rng.choice(CLASSES), c, accent, rng.choice(PATTERNS), rng.randrange(3), rng.randrange(3))
        if inst not in RESERVED:
            return inst


def random_scene(rng: random.Random, instance: Instance | None = None, allow_held_out: bool = False) -> Scene:
    inst = instance or random_instance(rng)
    while True:
        background = rng.choice(BACKGROUNDS)
        if allow_held_out or (inst.cls, inst.color, background) not in HELD_OUT_COMBOS:
            break
    accessory = None
    if inst.cls in WEARS_ACCESSORIES and rng.random() < 0.3:
        accessory = rng.choice(ACCESSORIES)
    return Scene(inst, background, rng.choice(POSITIONS), rng.choice(SIZES), accessory, rng.randrange(2**31))


def pretraining_scene(index: int, base_seed: int = 0) -> Scene:
    """Scene number `index` of the pretraining stream: deterministic, never a reserved subject, never a
    held-out combination."""
    return random_scene(random.Random(f"{base_seed}:{index}"))


# --- captions ---------------------------------------------------------------------------------------

def noun_phrase(scene: Scene, rng: random.Random, subject_words: str | None = None) -> str:
    """"a small red striped robot": each attribute word appears with some probability, so the model learns
    to fill in what a caption leaves out, and learns what each word controls when it is there."""
    inst = scene.instance
    words = []
    if rng.random() < 0.3:
        words.append(scene.size)
    if rng.random() < 0.75:
        words.append(inst.color)
    if inst.pattern != "plain" and rng.random() < 0.4:
        words.append(PATTERN_WORDS[inst.pattern])
    words.append(subject_words or inst.cls)
    return "a " + " ".join(words)


ACCENT_PHRASES = ("with {} accents", "with {} trim")


def caption(scene: Scene, rng: random.Random, subject_words: str | None = None) -> str:
    """One of several wordings; the background, when named, always matches the picture. The accent color
    is named now and then, as real captions name some details; proportions and parts never are: like one
    dog's face, they have no word, and only the pictures can teach them."""
    np = noun_phrase(scene, rng, subject_words)
    if rng.random() < 0.2:
        np += " " + rng.choice(ACCENT_PHRASES).format(scene.instance.accent)
    if scene.accessory:
        np += " " + rng.choice({"hat": ("wearing a hat", "with a hat"), "scarf": ("with a scarf", "wearing a scarf")}[scene.accessory])
    place = rng.choice(BACKGROUND_PHRASES[scene.background])
    where = POSITION_PHRASES[scene.position]
    templates = (
        f"{np} {place}",
        f"{np} {place}, {where}",
        f"a photo of {np} {place}",
        f"{np} {where}, {place}",
        f"a picture of {np} {place}",
        f"{np}",
    )
    weights = (4, 2, 2, 2, 1, 0.3)
    return rng.choices(templates, weights)[0]


def describe(instance: Instance, background: str, position: str = "center", size: str = "large",
             accessory: str | None = None, color: str | None = None) -> str:
    """The canonical caption for a scene we want to ask for (evaluation prompts): every attribute named."""
    inst = instance if color is None else dataclasses.replace(instance, color=color)
    text = f"a {inst.color} {inst.cls}"
    if accessory:
        text += f" wearing a {accessory}" if accessory == "hat" else f" with a {accessory}"
    return f"{text} {BACKGROUND_PHRASES[background][0]}, {POSITION_PHRASES[position]}"
