"""What toy-bench asks (docs/toybench/README.md): its rows, the reserved subjects, their 4 references, the 12
prompts in DreamBench's proportions, the words line's prompts and the oracle's scenes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...errors import UserError
from ...toyworld import DEV_SUBJECTS, TEST_SUBJECTS, Scene, render
from ...toyworld.world import ACCENT_PHRASES, BACKGROUND_PHRASES, PATTERN_WORDS, WEARS_ACCESSORIES
from ...personalize.placeholder import PLACEHOLDER, remove_placeholder

ROWS = ("references", "base", "embedding", "joint", "two-stage-qkv", "two-stage-lora", "two-stage-prior")
METRICS = ("dino", "clip_i", "clip_t", "identity", "identity_all", "prompt")
# The trained rows: TrainConfig fields over the family's defaults.
RECIPES = {
    "embedding": dict(stages="embedding"),
    "joint": dict(stages="joint"),
    "two-stage-qkv": dict(stages="two-stage", layers="qkv"),
    "two-stage-lora": dict(stages="two-stage", layers="lora"),
    "two-stage-prior": dict(stages="two-stage", layers="qkv", prior_preservation=True),
}
WORDS = "words"  # the base model with every attribute a caption can name
ORACLE = "oracle"  # toyworld's render of each prompt
EXTRAS = (WORDS, ORACLE)  # scored like rows, reported apart: not methods
STAGE1_ROW = "embedding"  # its training is the stage 1 every two-stage row continues from
SPLITS = {"test": TEST_SUBJECTS, "dev": DEV_SUBJECTS}
REFERENCE_SIZE = 64  # toyworld's own size, the one the reader was trained at
# (background, position) of the 4 references: indoor and plain settings; the prompts ask for the rest.
REFERENCE_SHOTS = (("white", "center"), ("wood", "left"), ("brick", "right"), ("pink", "center"))
NEW_BACKGROUNDS = ("beach", "snow", "grass", "night", "water", "forest")
NEW_COLORS = ("red", "blue", "yellow", "green", "purple", "orange")  # the first two a subject lacks are asked
VALIDATION_PROMPTS = 4  # new backgrounds drawn along a run by --validation-steps
# How the report (and the goals' names) call the rows and the metrics.
LABELS = {"references": "references (ceiling)", "base": "base, class word (floor)",
          "embedding": "embedding (stage 1)", "joint": "joint from step 0", "two-stage-qkv": "two-stage, Q/K/V",
          "two-stage-lora": "two-stage, LoRA", "two-stage-prior": "two-stage, prior pres.",
          WORDS: "words: every nameable attribute", ORACLE: "oracle: the prompt rendered"}
HEADINGS = {"dino": "toyDINO", "clip_i": "toyCLIP-I", "clip_t": "toyCLIP-T", "identity": "identity",
            "identity_all": "identity, all", "prompt": "prompt"}


@dataclass
class ToyBenchConfig:
    """What a toy-bench run is asked to do; `tokenbooth eval toybench` fills it from its flags."""

    model: str = "mini"
    split: str = "test"
    subjects: int | None = None  # the first N subjects of the split; None: all of them
    seed: int = 0  # of training and of sampling
    train: dict = field(default_factory=dict)  # TrainConfig fields over the family's (e.g. fewer steps)
    sampling: dict = field(default_factory=dict)  # SamplingConfig fields over the family's (e.g. sampler="sjd")
    dino: str | None = None  # None: the bundled toyDINO
    clip: str | None = None  # None: the bundled toyCLIP
    reader: str | None = None  # None: the bundled attribute reader
    rows: tuple = ROWS  # a subset for tuning runs (the references row always comes: the others score against it)
    validation_steps: int | None = None  # draw VALIDATION_PROMPTS every N training steps and log their fidelity


def check_rows(rows) -> tuple:
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows takes a comma-separated list of {', '.join(ROWS)} (got {','.join(rows) or 'none'})")
    return tuple(r for r in ROWS if r in rows or r == "references")  # in the table's order


def subjects(split: str = "test", n: int | None = None) -> list:
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    pool = list(SPLITS[split])
    if n is not None and not 1 <= n <= len(pool):
        raise UserError(f"--subjects must be between 1 and {len(pool)} for the {split} split (got {n})")
    return pool[:n]


def reference_scenes(inst) -> list[Scene]:
    return [Scene(inst, bg, pos, "large", None, seed=2000 + i) for i, (bg, pos) in enumerate(REFERENCE_SHOTS)]


def references(inst, size: int = REFERENCE_SIZE) -> list:
    """The subject's 4 reference pictures: drawn at `size` itself (not resized), as a camera would."""
    return [render(scene, size) for scene in reference_scenes(inst)]


def prompts(inst) -> list[dict]:
    """12 prompts, each {"kind", "text", "asks"}: asks holds what the reader should read back."""
    subject = f"{PLACEHOLDER} {inst.cls}"
    wears = inst.cls in WEARS_ACCESSORIES
    # each new background in its plainest wording, then in a second one, as many as the kind needs
    places = [(bg, BACKGROUND_PHRASES[bg][k]) for k in (0, 1) for bg in NEW_BACKGROUNDS][: 8 if wears else 10]
    out = [dict(kind="context", text=f"a {subject} {phrase}", asks={"background": bg}) for bg, phrase in places]
    colors = [c for c in NEW_COLORS if c not in (inst.color, inst.accent)][:2]
    out += [dict(kind="color", text=f"a {color} {subject} {BACKGROUND_PHRASES[bg][0]}",
                 asks={"background": bg, "color": color}) for color, bg in zip(colors, ("grass", "snow"))]
    if wears:
        out += [dict(kind="accessory", text=f"a {subject} wearing a hat {BACKGROUND_PHRASES['beach'][0]}",
                     asks={"background": "beach", "accessory": "hat"}),
                dict(kind="accessory", text=f"a {subject} with a scarf {BACKGROUND_PHRASES['forest'][0]}",
                     asks={"background": "forest", "accessory": "scarf"})]
    return out


def validation_prompts(class_name: str | None) -> list[str]:
    """--validation-steps' pictures: the first new backgrounds. Without a class (the run's recorded settings,
    shared by every subject) the prompts name it "{class}"."""
    return [f"a {PLACEHOLDER} {class_name or '{class}'} {BACKGROUND_PHRASES[bg][0]}"
            for bg in NEW_BACKGROUNDS[:VALIDATION_PROMPTS]]


def worded_prompt(asked: dict, inst) -> str:
    """The words line's prompt: [V] spelled out in every word a pretraining caption may use for the subject,
    its body color (unless the prompt asks for another), pattern and accent color, as captions word them."""
    words = [] if "color" in asked["asks"] else [inst.color]
    if inst.pattern != "plain":  # captions never say "plain"
        words.append(PATTERN_WORDS[inst.pattern])
    subject = " ".join([*words, inst.cls, ACCENT_PHRASES[0].format(inst.accent)])
    return asked["text"].replace(f"{PLACEHOLDER} {inst.cls}", subject)


def words_fit(backbone, insts) -> bool:
    """Whether every words prompt fits the model's context with its image (the longest prompts of the bench)."""
    longest = max(len(backbone.prompt_ids(worded_prompt(p, inst))) for inst in insts for p in prompts(inst))
    return longest + backbone.layout.body_length <= backbone.max_length


def prompted_scenes(inst) -> list[Scene]:
    """The oracle's pictures: each prompt's asks rendered by toyworld with the subject itself."""
    out = []
    for i, asked in enumerate(p["asks"] for p in prompts(inst)):
        subject = replace(inst, color=asked["color"]) if "color" in asked else inst
        out.append(Scene(subject, asked["background"], "center", "large", asked.get("accessory"), seed=3000 + i))
    return out


def class_prompt(text: str) -> str:
    """The base row's prompt: the class word alone ("a [V] robot in the snow" -> "a robot in the snow")."""
    return remove_placeholder(text, PLACEHOLDER)
