"""toy-bench v2: the paper's Table 1 and its ablations, asked of mini on a CPU.

    tokenbooth eval toybench --output docs/toybench [--split test|dev] [--subjects N] [--sampler sjd]

Subjects    toyworld's reserved instances, which mini's pretraining never saw: TEST_SUBJECTS (12, one per
            class, never tuned on) by default, DEV_SUBJECTS (24, what mini's defaults were tuned on) with
            --split dev (toyworld/world.py).
References  4 renders per subject (64 px), in the plain and indoor settings a user's own photos would show.
Prompts     12 per subject in DreamBench's proportions (Ruiz et al. 2023: mostly recontextualisation, some
            property changes, accessories for live subjects): backgrounds no reference shows, 2 other body
            colors, and a hat and a scarf for the classes that wear them (more backgrounds for the others).
            The same list on every run; the placeholder stays in ("a [V] robot in the snow").
Rows        references       each reference against the other references: the ceiling
            base             mini prompted with the class word, no [V]: the floor
            embedding        stage 1 only ([V]'s embedding)
            joint            [V] and Q/K/V from step 0 (the paper's failing variant)
            two-stage-qkv    stage 1, then Q/K/V (the paper's method)
            two-stage-lora   stage 1, then LoRA on Q/K/V
            two-stage-prior  two-stage Q/K/V with prior preservation
            Two more lines, scored like rows and kept apart from "rows" in results.json (not methods):
            words            the base model told every attribute a caption can name: [V] spelled out as body
                             color, pattern and accent color ("a brown robot with purple accents on the
                             beach"): what text alone carries. Proportions and parts have no word.
            oracle           toyworld's own render of what each prompt asks, the subject exactly (its asked
                             color), centered: what a perfect model would score, i.e. how much of the
                             references' ceiling the prompts leave reachable (a new background or body color
                             moves every metric)
            Stage 1 is trained once per subject (the embedding row) and every two-stage row continues from it
            (`train(stage1_from=...)`, bitwise the run that trains its own): the rows differ in stage 2 alone.
            Training and sampling use the model family's defaults (backbones/families.py).
Metrics     dino          toyDINO (DINO's role, assets/toydino): cosine similarity to the subject's references
            clip_i        toyCLIP image features, the same (CLIP-I)
            clip_t        toyCLIP, image against its prompt with [V] removed (CLIP-T)
            identity      the attribute reader (eval/reader.py): share of the subject's identity attributes
                          read right; a prompt that changes the body color takes it out of identity
            identity_all  1 when every one of them is read right, else 0
            prompt        share of what the prompt asked for that is read back (background; the new body
                          color; the accessory)
            dino, clip_i and clip_t go through DreamBench's own code (metrics.Scorer); the references row has no
            prompt, so no clip_t and no prompt (null).
Aggregation DreamBench's: an image's similarity is its mean over the subject's references, a subject's score
            the mean over its images, the bench's the mean over subjects. Each figure has a 95% interval from
            a bootstrap over subjects and, within each drawn subject, over its prompts (percentile interval,
            1000 resamples, fixed seed): how far the figure would move on another draw of subjects and prompts.
            The paper's comparisons (Q/K/V against embedding only and joint, LoRA against embedding only) also as
            paired differences, image by image, with the interval of the difference itself.

    OUT/run.json                          the settings that decide the images; a restart must use the same
    OUT/subjects/KEY/adapters/ROW/        the row's training (embedding: the shared stage 1)
    OUT/subjects/KEY/images/ROW/PP.png    one image per prompt
    OUT/subjects/KEY/scores/ROW.json      per-image scores, with the encoders that gave them
    OUT/grids/KEY.png, report.md, report.png, results.json

Restart: every piece above is reused when it is whole (adapters resume from their last checkpoint; a row's
images are drawn together, so a half-drawn row is drawn again, the same) and the results are those of an
uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import (atomic_save_image, atomic_write_json, atomic_write_text, check_can_create, read_json_object,
                  read_jsonl)
from ..toyworld import DEV_SUBJECTS, TEST_SUBJECTS, Scene, render
from ..toyworld.world import ACCENT_PHRASES, BACKGROUND_PHRASES, PATTERN_WORDS, WEARS_ACCESSORIES
from . import metrics
from .reader import IDENTITY

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
PLACEHOLDER = "[V]"
REFERENCE_SIZE = 64  # toyworld's own size, the one the reader was trained at
# (background, position) of the 4 references: indoor and plain settings; the prompts ask for the rest.
REFERENCE_SHOTS = (("white", "center"), ("wood", "left"), ("brick", "right"), ("pink", "center"))
NEW_BACKGROUNDS = ("beach", "snow", "grass", "night", "water", "forest")
NEW_COLORS = ("red", "blue", "yellow", "green", "purple", "orange")  # the first two a subject lacks are asked
VALIDATION_PROMPTS = 4  # new backgrounds drawn along a run by --validation-steps
RESAMPLES = 1000  # bootstrap resamples: the interval's ends move by about 0.001 between seeds at this count
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


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


# --- subjects, references, prompts -------------------------------------------------------------------

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
    return metrics.remove_placeholder(text, PLACEHOLDER)


# --- the reader's scores ------------------------------------------------------------------------------

def reading_scores(reading: dict, inst, asks: dict | None) -> dict:
    """identity, identity_all and prompt of one picture, from what the reader read in it, and which identity
    attributes it read right ("attributes"). asks: what its prompt asked for (None for a reference, which
    answers no prompt)."""
    # an identity attribute the prompt asks to change (the body color) is no longer the subject's to keep
    kept = [a for a in IDENTITY if a not in (asks or {})]
    right = [reading[a] == getattr(inst, a) for a in kept]
    return {"identity": sum(right) / len(right), "identity_all": float(all(right)),
            "prompt": None if asks is None else sum(reading[a] == v for a, v in asks.items()) / len(asks),
            "attributes": dict(zip(kept, right))}


def reader_scores(reader, images, inst, asks: list[dict | None]) -> list[dict]:
    """`reading_scores` for each image; reader: anything with `read(images) -> [{attribute: value}]`."""
    return [reading_scores(r, inst, a) for r, a in zip(reader.read(images), asks)]


# --- aggregation --------------------------------------------------------------------------------------

def bench_mean(per_subject: list[list[float]]) -> float:
    """DreamBench's aggregation: the mean over subjects of the mean over each subject's images."""
    return float(np.mean([np.mean(values) for values in per_subject]))


def bootstrap_ci(per_subject: list[list[float]], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> list[float]:
    """Percentile interval of `bench_mean` over resamples that draw the subjects with replacement and, within
    every drawn subject, its images (prompts) with replacement: both are samples of what could be asked."""
    rng = np.random.default_rng(seed)
    counts = np.array([len(v) for v in per_subject])
    table = np.zeros((len(per_subject), counts.max()))
    for i, values in enumerate(per_subject):
        table[i, : len(values)] = values
    drawn = rng.integers(len(per_subject), size=(resamples, len(per_subject)))  # subjects
    n = counts[drawn]
    picks = (rng.random((*drawn.shape, counts.max())) * n[..., None]).astype(int)  # images of each drawn subject
    used = np.arange(counts.max()) < n[..., None]  # a subject with n images draws n of them
    means = np.where(used, table[drawn[..., None], picks], 0.0).sum(-1) / n
    tail = 100 * (1 - confidence) / 2
    return [float(x) for x in np.percentile(means.mean(-1), [tail, 100 - tail])]


def summarize(scores: dict[str, list[list[dict]]]) -> dict:
    """scores[row][subject] = that subject's per-image scores -> {row: {metric: {"mean", "ci"}}} (None for a
    metric the row does not have)."""
    rows = {}
    for row, per_subject in scores.items():
        rows[row] = {}
        for metric in METRICS:
            values = [v for v in ([s[metric] for s in images if s[metric] is not None] for images in per_subject) if v]
            rows[row][metric] = ({"mean": bench_mean(values), "ci": bootstrap_ci(values)} if values
                                 else {"mean": None, "ci": None})
    return rows


# The paper's comparisons as paired differences (the same subjects and prompts in both rows): the interval is
# that of the difference itself, which two rows' overlapping intervals cannot tell.
COMPARISONS = (("two-stage-qkv", "embedding"), ("two-stage-qkv", "joint"), ("two-stage-lora", "embedding"))
COMPARED = ("dino", "clip_i")


def paired_differences(scores: dict[str, list[list[dict]]]) -> dict:
    """{"A - B": {metric: {"mean", "ci"}}} for each comparison whose two rows were run."""
    out = {}
    for a, b in [(a, b) for a, b in COMPARISONS if a in scores and b in scores]:
        out[f"{a} - {b}"] = {}
        for metric in COMPARED:
            diffs = [[x[metric] - y[metric] for x, y in zip(mine, theirs)]
                     for mine, theirs in zip(scores[a], scores[b])]
            out[f"{a} - {b}"][metric] = {"mean": bench_mean(diffs), "ci": bootstrap_ci(diffs)}
    return out


def goals(rows: dict, differences: dict) -> dict:
    """Issue #10's goals for the paper's row, each {"value", "target", "met"}; a goal whose rows were not run
    is left out. Fidelity is toyDINO (DINO's role)."""
    out = {}
    qkv, refs, base = rows.get("two-stage-qkv"), rows["references"], rows.get("base")
    if qkv is None:
        return out
    share = qkv["dino"]["mean"] / refs["dino"]["mean"]
    out["fidelity, share of the references' ceiling"] = {"value": share, "target": ">= 0.90", "met": share >= 0.9}
    gap = differences.get("two-stage-qkv - embedding")
    if gap:
        out["fidelity above embedding only (paired interval's low end)"] = {
            "value": gap["dino"]["ci"][0], "target": "> 0", "met": gap["dino"]["ci"][0] > 0}
    if "joint" in rows:
        margin = qkv["dino"]["mean"] - rows["joint"]["dino"]["mean"]
        out["joint below two-stage (toyDINO margin)"] = {"value": margin, "target": "> 0", "met": margin > 0}
    for metric in ("clip_t", "prompt") if base else ():
        kept = qkv[metric]["mean"] / base[metric]["mean"]
        out[f"{HEADINGS[metric]} kept, share of base"] = {"value": kept, "target": ">= 0.95", "met": kept >= 0.95}
    return out


def attribute_shares(scores: dict[str, list[list[dict]]]) -> dict:
    """{row: {identity attribute: share of images read right}}, over every subject's images: which parts of
    the identity a row carries (the reader's identity figure averages them)."""
    out = {}
    for row, per_subject in scores.items():
        right = {a: [] for a in IDENTITY}
        for image in (image for images in per_subject for image in images):
            for a, ok in image["attributes"].items():
                right[a].append(ok)
        out[row] = {a: float(np.mean(v)) if v else None for a, v in right.items()}
    return out


def subject_means(scores: dict[str, list[list[dict]]], keys: list[str]) -> dict:
    """{row: {subject: {metric: mean over its images}}}."""
    def mean(images, metric):
        values = [s[metric] for s in images if s[metric] is not None]
        return float(np.mean(values)) if values else None

    return {row: {key: {m: mean(images, m) for m in METRICS} for key, images in zip(keys, per_subject)}
            for row, per_subject in scores.items()}


# --- the run ------------------------------------------------------------------------------------------

class Bench:
    """One run's fixed parts: the output folder, the model, the settings and the encoders."""

    def __init__(self, cfg: ToyBenchConfig, out: Path):
        from ..backbones import load_backbone
        from ..personalize.recipe import check_train_values
        from ..sampling import SamplingConfig, check_sampler

        self.cfg, self.out = cfg, Path(out)
        self.subjects = subjects(cfg.split, cfg.subjects)
        self.rows = check_rows(cfg.rows)
        check_train_values(cfg.train)
        base = load_backbone(cfg.model)
        self.family = base.family
        self.sampling = SamplingConfig.for_family(base.family, **{"seed": cfg.seed, **cfg.sampling})
        self.sampling.validate()
        check_sampler(self.sampling, base.layout.body_length)
        self.check_recipes(base)
        self.extras = EXTRAS if words_fit(base, self.subjects) else (ORACLE,)
        if WORDS not in self.extras:
            print(f"tokenbooth: warning: toy-bench leaves out the words line: its prompts do not fit "
                  f"{base.name}'s context of {base.max_length} tokens", file=sys.stderr)
        check_can_create(self.out, "output folder", folder=True)
        self.settings = self.decisive_settings(base)
        check_settings(self.out, self.settings, write=False)  # refused before the encoders load
        self.scorer, self.reader, self.encoders = load_encoders(cfg)

    def train_config(self, row: str, class_name: str | None):
        from ..personalize import TrainConfig

        return TrainConfig.for_family(self.family, class_name=class_name, seed=self.cfg.seed,
                                      **{**RECIPES[row], **self.cfg.train, **self.validation(class_name)})

    def validation(self, class_name: str | None) -> dict:
        """Fidelity along the run (--validation-steps): the first new backgrounds, drawn every N steps."""
        if not self.cfg.validation_steps:
            return {}
        # without a class (the run's recorded settings, shared by every subject) the prompts name it "{class}"
        prompts = [f"a {PLACEHOLDER} {class_name or '{class}'} {BACKGROUND_PHRASES[bg][0]}"
                   for bg in NEW_BACKGROUNDS[:VALIDATION_PROMPTS]]
        return dict(validation_steps=self.cfg.validation_steps, validation_prompts=prompts)

    def check_recipes(self, base) -> None:
        """Before any work: every row's recipe is valid for every subject's class word on this model."""
        from ..personalize import check_class_name
        from ..personalize.recipe import check_training_fits

        for row in [r for r in RECIPES if r in self.rows]:
            for cls in sorted({inst.cls for inst in self.subjects}):
                cfg = self.train_config(row, cls)
                cfg.validate()
                check_class_name(base, cls)
                check_training_fits(base, cfg)

    def decisive_settings(self, base) -> dict:
        """What decides the adapters and images (not the subjects: each subject's work stands alone)."""
        from ..personalize.adapter import base_fingerprint

        train = {row: {k: v for k, v in asdict(self.train_config(row, None)).items() if k != "class_name"}
                 for row in RECIPES}
        settings = {"model": base.name, "base_fingerprint": base_fingerprint(base.folder),
                    "sampling": self.sampling.to_dict(), "train": train, "bench": "toy-bench v2"}
        return json.loads(json.dumps(settings))  # as run.json will hold them

    def folder(self, inst) -> Path:
        return self.out / "subjects" / inst.key


def load_encoders(cfg: ToyBenchConfig):
    """(Scorer with toyDINO and toyCLIP, the reader, {encoder: fingerprint}); the bundled ones unless named.
    CLIP first: a wrong --clip is named before a missing toyDINO."""
    from ..assets import READER_DIR, TOYCLIP_DIR, TOYDINO_DIR
    from .reader import load_reader

    clip = metrics.load_clip(cfg.clip or str(bundled(TOYCLIP_DIR, "toyCLIP", "toyclip", "--clip")))
    clip.require_tokenizer()
    dino = metrics.load_dino(cfg.dino or str(bundled(TOYDINO_DIR, "toyDINO", "toydino", "--dino")))
    reader_dir = Path(cfg.reader) if cfg.reader else READER_DIR
    reader = load_reader(reader_dir)  # a missing one is named with the script that makes it
    sources = {"dino": dino.source, "clip": clip.source, "reader": str(reader_dir)}
    return metrics.Scorer(dino, clip), reader, {name: _fingerprint(s) for name, s in sources.items()}


def bundled(folder: Path, name: str, script: str, flag: str) -> Path:
    if not (folder / "config.json").is_file():
        raise UserError(f"{name} is not in {folder} yet: make it with python -m tokenbooth.pretrain.{script} "
                        f"(or pass {flag} PATH)")
    return folder


def _fingerprint(source: str) -> str:
    """Identifies an encoder's weights, so that scores made with other ones are not reused."""
    from ..personalize.adapter import base_fingerprint

    return base_fingerprint(Path(source)) if Path(source).is_dir() else source


def check_settings(out: Path, settings: dict, write: bool = True) -> None:
    """A restart must ask for what the run in `out` was started with; a new run records it (with write)."""
    path = out / "run.json"
    if path.is_file():
        saved = read_json_object(path, "toy-bench settings").get("settings", {})
        for key, value in settings.items():
            if saved.get(key) != value:
                raise UserError(f"{out} holds a toy-bench run with other settings ({key}); use the same settings "
                                f"to continue it, or another --output")
    elif write:
        atomic_write_json(path, {"settings": settings})


def adapter(bench: Bench, inst, row: str) -> Path:
    """The row's trained adapter, trained (or resumed) unless finished. Two-stage rows start from the
    embedding row's finished stage 1."""
    from ..backbones import load_backbone
    from ..personalize import train
    from ..personalize.recipe import latest_checkpoint

    folder = bench.folder(inst) / "adapters" / row
    if (folder / "adapter_config.json").is_file():
        return folder
    cfg = bench.train_config(row, inst.cls)
    stage1 = adapter(bench, inst, STAGE1_ROW) if cfg.stages == "two-stage" else None
    base = load_backbone(bench.cfg.model)  # fresh: training changes the model in memory
    train(base, references(inst, base.resolution), cfg, folder, resume=latest_checkpoint(folder) is not None,
          progress=False, stage1_from=stage1)
    return folder


def drawn(bench: Bench, inst, row: str) -> list:
    """The row's images, one per prompt, drawn unless all are on disk. A row is drawn as one batch, so a
    half-written row is drawn again whole, and the same."""
    from ..backbones import load_backbone
    from ..personalize import load_adapter
    from ..sampling import draw

    asked = prompts(inst)
    files = [bench.folder(inst) / "images" / row / f"{i:02d}.png" for i in range(len(asked))]
    if all(f.is_file() for f in files):
        return metrics.read_images(files)
    if row == "base":
        model, texts = load_backbone(bench.cfg.model), [class_prompt(p["text"]) for p in asked]
    elif row == WORDS:
        model, texts = load_backbone(bench.cfg.model), [worded_prompt(p, inst) for p in asked]
    else:
        model = load_adapter(load_backbone(bench.cfg.model), adapter(bench, inst, row))
        texts = [p["text"] for p in asked]
    images = draw(model, texts, bench.sampling).images
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for image, f in zip(images, files):
        atomic_save_image(image, f)
    return images


def scored(bench: Bench, inst, row: str, images: list, refs: list) -> list[dict]:
    """Per-image scores of a row (of the references themselves for "references"), reused when the same
    encoders made them."""
    path = bench.folder(inst) / "scores" / f"{row}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["encoders"] == bench.encoders and all("attributes" in image for image in saved["images"]):
            return saved["images"]  # (scores from before the per-attribute readings are made again)
    if row == "references":
        similar = bench.scorer.score(refs, refs)["real"]  # each reference against the others
        read = reader_scores(bench.reader, refs, inst, [None] * len(refs))
        texts = [None] * len(refs)
    else:
        asked = prompts(inst)
        texts = [class_prompt(p["text"]) for p in asked]
        similar = bench.scorer.score(images, refs, texts)["images"]
        read = reader_scores(bench.reader, images, inst, [p["asks"] for p in asked])
    records = [{"dino": s["dino"], "clip_i": s["clip_i"], "clip_t": s.get("clip_t"), **r, "clip_t_text": t}
               for s, r, t in zip(similar, read, texts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"encoders": bench.encoders, "images": records})
    return records


def run_subject(bench: Bench, inst) -> dict[str, list[dict]]:
    """Every row of one subject: trained, drawn, scored; its grid. Returns {row: per-image scores}."""
    from ..images import labeled_rows

    refs = references(inst)
    drawn_rows = (*bench.rows[1:], *(line for line in bench.extras if line != ORACLE))
    images = {"references": refs, **{row: drawn(bench, inst, row) for row in drawn_rows},
              ORACLE: [render(scene, REFERENCE_SIZE) for scene in prompted_scenes(inst)]}
    shown = (*bench.rows, *bench.extras)
    grid = labeled_rows([(LABELS[row], images[row]) for row in shown], min_cell=64)
    atomic_save_image(grid, bench.out / "grids" / f"{inst.key}.png")
    return {row: scored(bench, inst, row, images[row], refs) for row in shown}


def fidelity_along_the_run(bench: Bench) -> dict:
    """{row: {step: mean over subjects}} of the validation grids' fidelity (fidelity.jsonl in each trained row's
    adapter; a two-stage row's holds the stage 1 it continued from), the final grid at the last step."""
    from ..personalize.recipe import FIDELITY_LOG

    along = {}
    for row in [r for r in bench.rows if r in RECIPES]:
        by_step: dict[int, list[float]] = {}
        for inst in bench.subjects:
            for r in read_jsonl(bench.folder(inst) / "adapters" / row / FIDELITY_LOG):
                by_step.setdefault(r["step"], []).append(r["fidelity"])
        along[row] = {step: round(float(np.mean(v)), 4) for step, v in sorted(by_step.items())}
    return along


def add_seconds(out: Path, since: float) -> float:
    """Adds the time since `since` to the run's total (time.json, over every invocation); returns now. A run
    killed halfway loses at most the unfinished subject's time from the total."""
    path, now = out / "time.json", time.time()
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    atomic_write_json(path, {"seconds": total + now - since})
    return now


def run_toybench(cfg: ToyBenchConfig, output: Path) -> dict:
    """The whole bench into `output`; returns results.json's content."""
    from tqdm.auto import tqdm

    bench = Bench(cfg, output)
    out = bench.out
    try:
        (out / "grids").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    check_settings(out, bench.settings)
    clock = time.time()
    per_subject = []
    for inst in tqdm(bench.subjects, desc="toy-bench subjects", unit="subject"):
        per_subject.append(run_subject(bench, inst))
        clock = add_seconds(out, clock)
    scores = {row: [s[row] for s in per_subject] for row in bench.rows}
    extras = {line: [s[line] for s in per_subject] for line in bench.extras}
    keys = [inst.key for inst in bench.subjects]
    minutes = json.loads((out / "time.json").read_text())["seconds"] / 60
    rows, differences = summarize(scores), paired_differences(scores)
    results = {"rows": rows, **summarize(extras), "differences": differences, "goals": goals(rows, differences),
               "identity_by_attribute": attribute_shares({**scores, **extras}),
               "subjects": keys,
               "minutes": round(minutes, 2), "per_subject": subject_means(scores, keys), "split": cfg.split,
               "settings": bench.settings, "encoders": bench.encoders,
               "bootstrap": {"resamples": RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE}}
    if cfg.validation_steps:
        results["fidelity_along_the_run"] = fidelity_along_the_run(bench)
    report = markdown(results, bench)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report)
    atomic_save_image(bar_plot(results["rows"]), out / "report.png")
    print(report)
    print(f"report: {out / 'report.md'}, plot {out / 'report.png'}, grids {out / 'grids'}")
    return results


# --- report -------------------------------------------------------------------------------------------

LABELS = {"references": "references (ceiling)", "base": "base, class word (floor)",
          "embedding": "embedding (stage 1)", "joint": "joint from step 0", "two-stage-qkv": "two-stage, Q/K/V",
          "two-stage-lora": "two-stage, LoRA", "two-stage-prior": "two-stage, prior pres.",
          WORDS: "words: every nameable attribute", ORACLE: "oracle: the prompt rendered"}
HEADINGS = {"dino": "toyDINO", "clip_i": "toyCLIP-I", "clip_t": "toyCLIP-T", "identity": "identity",
            "identity_all": "identity, all", "prompt": "prompt"}


def cell(figure: dict) -> str:
    if figure["mean"] is None:
        return "-"
    lo, hi = figure["ci"]
    return f"{figure['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def training_note(train: dict) -> str:
    """The report's words for the training settings: the family's, and any a tuning run changed."""
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(train.items()))
    return "its family's training defaults" + (f" except {changed}" if changed else "")


def markdown(results: dict, bench: Bench) -> str:
    s = bench.sampling
    lines = [
        "# toy-bench v2: the paper's Table 1 on mini", "",
        f"{len(results['subjects'])} subjects of the {results['split']} split (reserved toyworld instances, never in "
        f"pretraining), 4 references and 12 prompts each, one image per prompt; {results['settings']['model']} "
        f"with {training_note(bench.cfg.train)}; sampling: CFG {s.cfg_scale}, image top-k {s.image_top_k}, seed "
        f"{s.seed}, {s.sampler} sampler. {results['minutes']:.1f} min of work in all, on this machine.", "",
        "| row | " + " | ".join(HEADINGS[m] for m in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for row, figures in results["rows"].items():
        lines.append(f"| {LABELS[row]} | " + " | ".join(cell(figures[m]) for m in METRICS) + " |")
    if results["differences"]:
        lines += ["", "Paired differences (the same subjects and prompts in both rows; 95% bootstrap interval of the "
                  "difference):", "", "| comparison | " + " | ".join(HEADINGS[m] for m in COMPARED) + " |",
                  "|---" * (len(COMPARED) + 1) + "|"]
        lines += [f"| {pair} | " + " | ".join(cell(figures[m]) for m in COMPARED) + " |"
                  for pair, figures in results["differences"].items()]
    lines += ["", "Two lines that are not methods, scored the same way: **words**, the base model told every "
              "attribute a caption can name ([V] spelled out as body color, pattern and accent color: what text "
              "alone carries; proportions and parts have no word), and the **oracle**, toyworld's own render of "
              "what each prompt asks, the subject exactly: what a perfect model would score against these "
              "references, the prompts' new backgrounds and colors included.", "",
              "| line | " + " | ".join(HEADINGS[m] for m in METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {LABELS[line]} | " + " | ".join(cell(results[line][m]) for m in METRICS) + " |"
              for line in EXTRAS if line in results]
    if "two-stage-qkv" in results["rows"]:
        share = results["rows"]["two-stage-qkv"]["dino"]["mean"] / results[ORACLE]["dino"]["mean"]
        lines += ["", f"Two-stage Q/K/V's toyDINO is {share:.0%} of the oracle's."]
    shares = results["identity_by_attribute"]
    lines += ["", "Identity, attribute by attribute (share of images the reader reads right; the body color "
              "left out where the prompt asks for another):", "",
              "| row | " + " | ".join(IDENTITY) + " |", "|---" * (len(IDENTITY) + 1) + "|"]
    lines += [f"| {LABELS[row]} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in by.values()) + " |"
              for row, by in shares.items()]
    if results.get("fidelity_along_the_run"):
        along = results["fidelity_along_the_run"]
        steps = sorted({step for points in along.values() for step in points})
        lines += ["", f"Fidelity along the run: toyDINO of {VALIDATION_PROMPTS} validation pictures (new backgrounds) "
                  f"to the references, every {bench.cfg.validation_steps} steps, mean over subjects (stage 1 ends at "
                  f"step {bench.train_config(STAGE1_ROW, None).stage1_steps}):", "",
                  "| row | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
        lines += [f"| {LABELS[row]} | " + " | ".join(f"{points[s]:.3f}" if s in points else "-" for s in steps) + " |"
                  for row, points in along.items()]
    if results["goals"]:
        lines += ["", "Goals (issue #10) for two-stage Q/K/V:", "", "| goal | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {name} | {g['value']:.3f} | {g['target']} | {'yes' if g['met'] else 'no'} |"
                  for name, g in results["goals"].items()]
    lines += ["", "Each cell: the mean over subjects of the mean over the subject's images, and its 95% interval "
              "from a bootstrap over subjects and their prompts (1000 resamples). toyDINO and toyCLIP-I: cosine "
              "similarity of an image to the subject's references, averaged over them (references: each against "
              "the others). toyCLIP-T: image against its prompt with [V] removed. identity: share of the subject's "
              "identity attributes (class, body and accent color, pattern, proportion, parts) the attribute "
              "reader reads right, the body color left out where the prompt asks for another; identity, all: "
              "share of images with every one right. prompt: share of what the prompt asked for (background, new "
              "body color, accessory) that the reader reads back. Stage 1 is trained once per subject and shared "
              "by the embedding row and every two-stage row. Grids: `grids/`; bar plot: `report.png`.", ""]
    return "\n".join(lines)


def bar_plot(rows: dict):
    """One group of bars per metric, one bar per row, its 95% interval as a whisker (Pillow only)."""
    from PIL import Image, ImageDraw

    colors = [(120, 120, 120), (200, 200, 200), (70, 160, 80), (200, 70, 70), (60, 110, 200), (140, 90, 200),
              (230, 140, 40)]
    w, h, left, bottom, top = 1000, 420, 50, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    y = lambda v: h - bottom - max(0.0, min(1.0, v)) * (h - bottom - top)  # noqa: E731
    group = (w - left - 20) / len(METRICS)
    bar = (group - 20) / len(rows)
    for g, metric in enumerate(METRICS):
        for r, (row, figures) in enumerate(rows.items()):
            figure = figures[metric]
            if figure["mean"] is None:
                continue
            x0 = left + g * group + 10 + r * bar
            d.rectangle([x0, y(figure["mean"]), x0 + bar - 2, h - bottom], fill=colors[r])
            xm = x0 + bar / 2 - 1
            d.line([xm, y(figure["ci"][0]), xm, y(figure["ci"][1])], fill="black", width=1)
            for v in figure["ci"]:
                d.line([xm - 3, y(v), xm + 3, y(v)], fill="black")
        d.text((left + g * group + 10, h - bottom + 10), HEADINGS[metric], fill="black")
    for frac in (0.0, 0.5, 1.0):
        d.text((8, y(frac) - 6), f"{frac:.1f}", fill="black")
    d.line([left, h - bottom, w - 10, h - bottom], fill="black")
    for r, row in enumerate(rows):
        x = left + (r % 4) * 230
        d.rectangle([x, 8 + (r // 4) * 20, x + 12, 20 + (r // 4) * 20], fill=colors[r])
        d.text((x + 16, 8 + (r // 4) * 20), LABELS[row], fill="black")
    return img
