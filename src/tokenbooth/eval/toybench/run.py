"""A toy-bench run (docs/toybench/README.md): each subject's rows trained, drawn and scored into the output
folder, every piece reused on restart when it is whole, then the summary and the report.

personalize, sampling, assets and the words line's prompts are called through their modules
(`personalize.train`, `sampling.draw`, `assets.TOYDINO_DIR`, `tasks.worded_prompt`) so that tests can stand in
for them."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ... import assets, personalize, sampling
from ...backbones import load_backbone
from ...errors import UserError
from ...images import labeled_rows
from ...io import atomic_save_image, atomic_write_json, atomic_write_text, check_can_create, read_jsonl
from ...personalize.adapter import CONFIG as ADAPTER_CONFIG
from ...personalize.adapter import base_fingerprint
from ...personalize.checks import check_training_fits
from ...personalize.config import check_train_values
from ...personalize.run_folder import FIDELITY_LOG, latest_checkpoint
from ...toyworld import render
from .. import metrics, stats
from ..fidelity import fidelity_scorer
from ..reader import IDENTITY, load_reader
from ..run_file import check_run_settings
from .report import bar_plot, markdown
from . import tasks
from .summary import attribute_shares, goals, paired_differences, subject_means, summarize
from .tasks import (EXTRAS, LABELS, ORACLE, RECIPES, REFERENCE_SIZE, STAGE1_ROW, WORDS, ToyBenchConfig, check_rows,
                    class_prompt, prompted_scenes, prompts, references, subjects, validation_prompts)


class Bench:
    """One run's fixed parts: the output folder, the model, the settings and the encoders."""

    def __init__(self, cfg: ToyBenchConfig, out: Path):
        self.cfg, self.out = cfg, Path(out)
        self.subjects = subjects(cfg.split, cfg.subjects)
        self.rows = check_rows(cfg.rows)
        check_train_values(cfg.train)
        base = load_backbone(cfg.model)
        self.family = base.family
        self.sampling = sampling.SamplingConfig.for_family(base.family, **{"seed": cfg.seed, **cfg.sampling})
        self.sampling.validate()
        sampling.check_sampler(self.sampling, base.layout.body_length)
        self.check_recipes(base)
        self.extras = EXTRAS if tasks.words_fit(base, self.subjects) else (ORACLE,)
        if WORDS not in self.extras:
            print(f"tokenbooth: warning: toy-bench leaves out the words line: its prompts do not fit "
                  f"{base.name}'s context of {base.max_length} tokens", file=sys.stderr)
        check_can_create(self.out, "output folder", folder=True)
        self.settings = self.decisive_settings(base)
        check_settings(self.out, self.settings, write=False)  # refused before the encoders load
        self.scorer, self.reader, self.encoders = load_encoders(cfg)

    def train_config(self, row: str, class_name: str | None):
        return personalize.TrainConfig.for_family(self.family, class_name=class_name, seed=self.cfg.seed,
                                                  **{**RECIPES[row], **self.cfg.train, **self.validation(class_name)})

    def validation(self, class_name: str | None) -> dict:
        """Fidelity along the run (--validation-steps): the first new backgrounds, drawn every N steps."""
        if not self.cfg.validation_steps:
            return {}
        return dict(validation_steps=self.cfg.validation_steps, validation_prompts=validation_prompts(class_name))

    def check_recipes(self, base) -> None:
        """Before any work: every row's recipe is valid for every subject's class word on this model."""
        for row in [r for r in RECIPES if r in self.rows]:
            for cls in sorted({inst.cls for inst in self.subjects}):
                cfg = self.train_config(row, cls)
                cfg.validate()
                personalize.check_class_name(base, cls)
                check_training_fits(base, cfg)

    def decisive_settings(self, base) -> dict:
        """What decides the adapters and images (not the subjects: each subject's work stands alone)."""
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
    clip = metrics.load_clip(cfg.clip or str(bundled(assets.TOYCLIP_DIR, "toyCLIP", "toyclip", "--clip")))
    clip.require_tokenizer()
    dino = metrics.load_dino(cfg.dino or str(bundled(assets.TOYDINO_DIR, "toyDINO", "toydino", "--dino")))
    reader_dir = Path(cfg.reader) if cfg.reader else assets.READER_DIR
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
    return base_fingerprint(Path(source)) if Path(source).is_dir() else source


def check_settings(out: Path, settings: dict, write: bool = True) -> None:
    """A restart must ask for what the run in `out` was started with; a new run records it (with write). A
    sampling or training setting that a later version added continues an older run while it keeps its default."""
    train = field_defaults(personalize.TrainConfig)
    defaults = {"sampling": field_defaults(sampling.SamplingConfig), "train": {row: train for row in RECIPES}}
    check_run_settings(out, settings, "toy-bench", write=write, defaults=json.loads(json.dumps(defaults)))


def field_defaults(config_class) -> dict:
    """A config dataclass's fields with the value each takes when not given."""
    out = {}
    for f in fields(config_class):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


# --- one subject ----------------------------------------------------------------------------------------

def adapter(bench: Bench, inst, row: str) -> Path:
    """The row's trained adapter, trained (or resumed) unless finished. Two-stage rows start from the
    embedding row's finished stage 1."""
    folder = bench.folder(inst) / "adapters" / row
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    cfg = bench.train_config(row, inst.cls)
    stage1 = adapter(bench, inst, STAGE1_ROW) if cfg.stages == "two-stage" else None
    base = load_backbone(bench.cfg.model)  # fresh: training changes the model in memory
    personalize.train(base, references(inst, base.resolution), cfg, folder,
                      resume=latest_checkpoint(folder) is not None, progress=False, stage1_from=stage1,
                      fidelity_scorer=fidelity_scorer)  # scores --validation-steps' pictures (toyDINO for mini)
    return folder


def drawn(bench: Bench, inst, row: str) -> list:
    """The row's images, one per prompt, drawn unless all are on disk. A row is drawn as one batch, so a
    half-written row is drawn again whole, and the same."""
    asked = prompts(inst)
    files = [bench.folder(inst) / "images" / row / f"{i:02d}.png" for i in range(len(asked))]
    if all(f.is_file() for f in files):
        return metrics.read_images(files)
    if row == "base":
        model, texts = load_backbone(bench.cfg.model), [class_prompt(p["text"]) for p in asked]
    elif row == WORDS:
        model, texts = load_backbone(bench.cfg.model), [tasks.worded_prompt(p, inst) for p in asked]
    else:
        model = personalize.load_adapter(load_backbone(bench.cfg.model), adapter(bench, inst, row))
        texts = [p["text"] for p in asked]
    images = sampling.draw(model, texts, bench.sampling).images
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for image, f in zip(images, files):
        atomic_save_image(image, f)
    return images


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
    refs = references(inst)
    drawn_rows = (*bench.rows[1:], *(line for line in bench.extras if line != ORACLE))
    images = {"references": refs, **{row: drawn(bench, inst, row) for row in drawn_rows},
              ORACLE: [render(scene, REFERENCE_SIZE) for scene in prompted_scenes(inst)]}
    shown = (*bench.rows, *bench.extras)
    grid = labeled_rows([(LABELS[row], images[row]) for row in shown], min_cell=64)
    atomic_save_image(grid, bench.out / "grids" / f"{inst.key}.png")
    return {row: scored(bench, inst, row, images[row], refs) for row in shown}


# --- the whole bench ------------------------------------------------------------------------------------

def fidelity_along_the_run(bench: Bench) -> dict:
    """{row: {step: mean over subjects}} of the validation grids' fidelity (fidelity.jsonl in each trained row's
    adapter; a two-stage row's holds the stage 1 it continued from), the final grid at the last step."""
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
    results = gather_results(bench, per_subject)
    report = markdown(results, bench)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report)
    atomic_save_image(bar_plot(results["rows"]), out / "report.png")
    print(report)
    print(f"report: {out / 'report.md'}, plot {out / 'report.png'}, grids {out / 'grids'}")
    return results


def gather_results(bench: Bench, per_subject: list[dict[str, list[dict]]]) -> dict:
    """results.json's content from every subject's per-image scores ({row: scores}, in the subjects' order)."""
    scores = {row: [s[row] for s in per_subject] for row in bench.rows}
    extras = {line: [s[line] for s in per_subject] for line in bench.extras}
    keys = [inst.key for inst in bench.subjects]
    minutes = json.loads((bench.out / "time.json").read_text())["seconds"] / 60
    rows, differences = summarize(scores), paired_differences(scores)
    results = {"rows": rows, **summarize(extras), "differences": differences, "goals": goals(rows, differences),
               "identity_by_attribute": attribute_shares({**scores, **extras}),
               "subjects": keys,
               "minutes": round(minutes, 2), "per_subject": subject_means(scores, keys), "split": bench.cfg.split,
               "settings": bench.settings, "encoders": bench.encoders,
               "bootstrap": {"resamples": stats.RESAMPLES, "seed": stats.BOOTSTRAP_SEED,
                             "confidence": stats.CONFIDENCE}}
    if bench.cfg.validation_steps:
        results["fidelity_along_the_run"] = fidelity_along_the_run(bench)
    return results
