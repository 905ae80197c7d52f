"""DreamBench (Ruiz et al. 2023) as users get it: `git clone github.com/google/dreambooth`; its `dataset/`
holds one folder of JPEGs per subject and `prompts_and_classes.txt`, a "Classes" list (`subject_name,class`)
and two prompt lists written as Python lines, `'a {0} {1} in the jungle'.format(unique_token, class_token),`
under "Object Prompts" and "Live Subject Prompts". Live subjects are the dogs and cats.

For every subject: personalize the backbone with its family's defaults (backbones/families.py), draw every
prompt with [V] as the unique token (the paper: 1 image per prompt, sampled with the family's settings; the
paper's CFG 4.0 and image top-k 2000 for Lumina-mGPT), score (metrics.py). `describe` lists what a run would do
(subjects, classes, images, prompts) without loading a model.

    OUT/run.json                       the settings that decide the images; a restart must use the same ones
    OUT/subjects/NAME/adapter/         the personalization (an adapter folder; an interrupted one resumes)
    OUT/subjects/NAME/images/PP-K.png  prompt PP, image K
    OUT/subjects/NAME/grid.png         references, then one row per prompt
    OUT/subjects/NAME/scores.json      written last: a subject that has it is finished and skipped on restart
    OUT/per_subject.{csv,json,md}      one row per finished subject
    OUT/overall.{csv,json,md}          the real-images row and the personalized model's row

Under `accelerate launch -m tokenbooth.eval dreambench ...` (or torchrun) the subjects still to do are split
between the processes (each takes every N-th), so none is done twice or missed; the main process writes
the tables once all are done. Without GPUs, `accelerate launch --multi_gpu --num_processes N` starts N CPU
processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__, backbones
from ..errors import UserError
from ..images import labeled_rows
from ..io import atomic_save_image, atomic_write_json, check_can_create
from ..backbones.quantize import QUANTIZE
from ..personalize import TrainConfig, check_class_name, load_reference_images, train
from ..personalize.adapter import CONFIG as ADAPTER_CONFIG
from ..personalize.adapter import load_for_sampling
from ..personalize.checks import check_training_fits
from ..personalize.config import check_train_values
from ..personalize.placeholder import PLACEHOLDER, remove_placeholder
from ..personalize.run_folder import latest_checkpoint
from ..sampling import SamplingConfig, check_sampler, draw
from ..sampling.processors import check_sampling_values
from . import metrics
from .dreambench_data import PROMPTS_FILE, DreamBench, Subject, parse_prompts_and_classes, read_dreambench, read_text
from .run_file import check_run_settings
from .tables import markdown_table, write_table

# --- the run ----------------------------------------------------------------------------------------------

@dataclass
class RunSettings:
    """What decides the images. A restart in the same output folder must use the same settings. None: the
    backbone family's value (backbones/families.py)."""
    model: str
    images_per_prompt: int = 1  # the paper's; DreamBooth drew 4
    seed: int = 0  # prompt i is drawn with seed + i
    cfg: float | None = None
    top_k: int | None = None
    placeholder: str = PLACEHOLDER  # DreamBench's unique_token
    stage1_steps: int | None = None
    stage2_steps: int | None = None
    batch_size: int | None = None
    sampler: str = "plain"
    sjd_window: int | None = None
    sjd_init: str | None = None
    sjd_coupling: str | None = None
    sjd_proactive: int | None = None
    # "int8" or "nf4": every subject trains QLoRA (stage 2 LoRA over the quantized base) and draws on that base,
    # as `demo --quantize` does, so a card that holds the quantized model runs the whole benchmark
    quantize: str = "none"
    resolution: int | None = None  # a Lumina-mGPT folder whose name does not say it, or Emu3's side in pixels

    def validate(self) -> None:
        """Refuses what no backbone could use, before any model loads."""
        if self.images_per_prompt < 1:
            raise UserError(f"--images-per-prompt must be >= 1 (got {self.images_per_prompt})")
        if self.quantize not in QUANTIZE:
            raise UserError(f"--quantize must be one of {', '.join(QUANTIZE)} (got {self.quantize!r})")
        check_sampling_values({"cfg_scale": self.cfg, "image_top_k": self.top_k})
        check_train_values({"placeholder": self.placeholder, "stage1_steps": self.stage1_steps,
                            "stage2_steps": self.stage2_steps, "batch_size": self.batch_size})


def sampling_config(settings: RunSettings, family: str, prompt_index: int = 0) -> SamplingConfig:
    given = {"cfg_scale": settings.cfg, "image_top_k": settings.top_k, "sjd_window": settings.sjd_window,
             "sjd_init": settings.sjd_init, "sjd_coupling": settings.sjd_coupling,
             "sjd_proactive": settings.sjd_proactive}
    return SamplingConfig.for_family(family, seed=settings.seed + prompt_index, sampler=settings.sampler,
                                     **{k: v for k, v in given.items() if v is not None})


def train_config(settings: RunSettings, family: str, class_name: str) -> TrainConfig:
    given = {name: getattr(settings, name) for name in ("stage1_steps", "stage2_steps", "batch_size")}
    if settings.quantize != "none":  # full Q/K/V cannot be trained on, nor drawn on, a quantized base
        given.update(layers="lora", quantize=settings.quantize)
    cfg = TrainConfig.for_family(family, class_name=class_name, placeholder=settings.placeholder, seed=settings.seed,
                                 **{k: v for k, v in given.items() if v is not None})
    cfg.validate()
    return cfg


def check_settings(out: Path, settings: RunSettings, is_main: bool) -> None:
    """A restart must use the settings the run in `out` started with; the main process records a new run's."""
    check_run_settings(out, asdict(settings), "DreamBench", write=is_main, stamp={"tokenbooth_version": __version__},
                       defaults={f.name: f.default for f in fields(RunSettings)})


def subject_folder(out: Path, name: str) -> Path:
    return out / "subjects" / name


def finished(out: Path, name: str) -> bool:
    return (subject_folder(out, name) / "scores.json").is_file()


def run_dreambench(settings: RunSettings, data: Path, output: Path, subjects: list[str] | None = None,
                   protocol: str = "paper", dino: str | None = None, clip: str | None = None) -> None:
    """Every subject of the dataset at `data` (or the named ones): personalize, draw, score; tables in `output`."""
    # cpu: without a GPU, processes started by `accelerate launch --multi_gpu` or torchrun share the work over
    # gloo (accelerate's own --cpu launches a single process unless MPI is set up). The timeout: shards can
    # finish hours apart, and the final wait must not give up after the default 30 minutes.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    settings.validate()
    bench = read_dreambench(data, subjects)
    out = Path(output)
    check_can_create(out, "output folder", folder=True)
    check_backbone(settings, bench)
    scorer = metrics.Scorer(metrics.load_dino(dino, state.device), metrics.load_clip(clip, state.device))
    scorer.clip.require_tokenizer()

    try:
        (out / "subjects").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {out}: {e.strerror}") from None
    check_settings(out, settings, state.is_main_process)
    todo = [s for s in bench.subjects if not finished(out, s.name)]
    state.wait_for_everyone()  # every process has listed what is left before any process finishes a subject
    mine = todo[state.process_index:: state.num_processes]
    if state.is_main_process:
        print(f"DreamBench: {len(bench.subjects)} subject(s), {len(bench.subjects) - len(todo)} already finished, "
              f"{len(todo)} to do on {state.num_processes} process(es)")
    shard = f" [{state.process_index + 1}/{state.num_processes}]" if state.num_processes > 1 else ""
    for subject in tqdm(mine, desc=f"subjects{shard}", unit="subject"):
        run_subject(bench, subject, settings, scorer, subject_folder(out, subject.name), state.process_index)
    state.wait_for_everyone()
    if state.is_main_process:
        prompts_file = Path(data) / PROMPTS_FILE
        names = [n for n, _ in parse_prompts_and_classes(read_text(prompts_file), prompts_file)[0]]
        write_results(out, names, settings, protocol)


def check_backbone(settings: RunSettings, bench: DreamBench) -> None:
    """Before hours of work: every class word tokenizes, and the settings make a valid recipe and sampler."""
    backbone = backbones.load_backbone(settings.model, resolution=settings.resolution)
    sampling = sampling_config(settings, backbone.family)
    sampling.validate()
    check_sampler(sampling, backbone.layout.body_length)
    for subject in bench.subjects:
        cfg = train_config(settings, backbone.family, subject.class_name)
        check_class_name(backbone, cfg.class_name)
        check_training_fits(backbone, cfg)


def run_subject(bench: DreamBench, subject: Subject, settings: RunSettings, scorer: metrics.Scorer, folder: Path,
                rank: int = 0) -> dict:
    """Personalize, draw every prompt, score; scores.json last. Whatever an earlier attempt finished (the
    adapter, drawn images) is reused."""
    adapter = folder / "adapter"
    t0 = time.time()
    personalize_subject(subject, settings, adapter)
    train_seconds = time.time() - t0

    t0 = time.time()
    personalized, _ = load_for_sampling(settings.model, adapter, settings.quantize, resolution=settings.resolution)
    prompts = bench.prompts(subject, settings.placeholder)
    drawn = draw_prompts(personalized, prompts, settings, folder, subject.name)
    generate_seconds = time.time() - t0

    references = metrics.read_images(subject.images)
    scores = score_drawn(scorer, drawn, references, settings.placeholder, folder)
    for row, path in zip(scores["real"], subject.images):
        row["file"] = path.name
    write_grid(references, drawn, prompts, folder / "grid.png")
    record = {"subject": subject.name, "class": subject.class_name, "live": subject.live,
              "references": len(references), **scores, "train_seconds": round(train_seconds, 1),
              "generate_seconds": round(generate_seconds, 1), "process_index": rank}
    atomic_write_json(folder / "scores.json", record)
    return record


def personalize_subject(subject: Subject, settings: RunSettings, adapter: Path) -> None:
    """The subject's adapter, trained (or resumed from its last checkpoint) unless already whole."""
    if (adapter / ADAPTER_CONFIG).is_file():
        return
    backbone = backbones.load_backbone(settings.model, resolution=settings.resolution, quantize=settings.quantize)
    cfg = train_config(settings, backbone.family, subject.class_name)
    images = load_reference_images(subject.folder, backbone.resolution)
    train(backbone, images, cfg, adapter, resume=latest_checkpoint(adapter) is not None)
    del backbone  # training changed it in memory; drawing uses the base plus the saved adapter


def draw_prompts(personalized, prompts: list[str], settings: RunSettings, folder: Path, name: str) -> list[tuple]:
    """[(file, prompt, image)], images_per_prompt per prompt; a prompt whose images are all on disk is not
    drawn again."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    drawn = []
    for i, prompt in enumerate(tqdm(prompts, desc=name, unit="prompt", leave=False)):
        files = [folder / "images" / f"{i:02d}-{k}.png" for k in range(settings.images_per_prompt)]
        if all(f.is_file() for f in files):
            images = metrics.read_images(files)
        else:
            images = draw(personalized, [prompt] * len(files), sampling_config(settings, personalized.family, i)).images
            for f, image in zip(files, images):
                atomic_save_image(image, f)
        drawn += [(f, prompt, image) for f, image in zip(files, images)]
    return drawn


def score_drawn(scorer: metrics.Scorer, drawn: list[tuple], references: list, placeholder: str, folder: Path) -> dict:
    """Scorer.score's {"images", "real"}, each drawn image's row naming its file, prompt and CLIP-T text."""
    texts = [remove_placeholder(p, placeholder) for _, p, _ in drawn]
    scores = scorer.score([im for _, _, im in drawn], references, texts)
    for row, (file, prompt, _), text in zip(scores["images"], drawn, texts):
        row.update(file=str(file.relative_to(folder)), prompt=prompt, clip_t_text=text)
    return scores


def write_grid(references: list, drawn: list[tuple], prompts: list[str], path: Path) -> None:
    """The references, then one row per prompt; cells at the drawn size, at most 128 px."""
    side = min(128, drawn[0][2].width)
    rows = [("references", [_cell(im, side) for im in references])]
    rows += [(p[:40], [_cell(im, side) for _, q, im in drawn if q == p]) for p in prompts]
    atomic_save_image(labeled_rows(rows), path)


def _cell(image, side: int):
    """A square grid cell: the center square, resized to `side`."""
    square = metrics.center_crop(image, min(image.size))
    return square if square.size == (side, side) else square.resize((side, side), Image.BICUBIC)


PER_SUBJECT_COLUMNS = ["subject", "class", "live", "references", "images", "dino", "clip_i", "clip_t",
                       "real_dino", "real_clip_i"]
OVERALL_COLUMNS = ["row", "subjects", "images", "dino", "clip_i", "clip_t"]


def write_results(out: Path, names: list[str], settings: RunSettings, protocol: str) -> dict:
    """The tables over every finished subject of the dataset (earlier runs with --subjects included)."""
    records = [json.loads((subject_folder(out, n) / "scores.json").read_text()) for n in names if finished(out, n)]
    per_subject = []
    for r in records:
        means = metrics.aggregate([r], "paper")
        per_subject.append({"subject": r["subject"], "class": r["class"], "live": r["live"],
                            "references": r["references"], "images": len(r["images"]), **means})
    total = metrics.aggregate(records, protocol)
    n_images = sum(len(r["images"]) for r in records)
    overall = [
        {"row": "real images (references vs each other)", "subjects": len(records),
         "images": sum(r["references"] for r in records), "dino": total["real_dino"], "clip_i": total["real_clip_i"],
         "clip_t": None},
        {"row": f"{settings.model}, personalized", "subjects": len(records), "images": n_images,
         "dino": total["dino"], "clip_i": total["clip_i"], "clip_t": total["clip_t"]},
    ]
    meta = {"protocol": protocol, "settings": asdict(settings),
            "missing_subjects": [n for n in names if not finished(out, n)]}
    write_table(out, "per_subject", per_subject, PER_SUBJECT_COLUMNS, "DreamBench, per subject", meta)
    title = f"DreamBench ({protocol} aggregation; CLIP-T with the placeholder removed from the prompt)"
    write_table(out, "overall", overall, OVERALL_COLUMNS, title, meta)
    print(markdown_table(overall, OVERALL_COLUMNS), end="")
    if meta["missing_subjects"]:
        print(f"not yet run: {', '.join(meta['missing_subjects'])}")
    print(f"tables written to {out}")
    return {"per_subject": per_subject, "overall": overall}
