"""What each click on the page does: plain functions of the server's state (`TokenboothApp`) and the form's
values, read top to bottom as the list of what the page can do.

app.py lays out the widgets and wires each event to one of these. They return plain values (text, files,
lists of choices) that app.py turns into Gradio updates, so each can be called, and tested, without Gradio or
a browser. A UserError they raise becomes the message line under the widgets that asked (app.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..backbones import BUILTIN
from ..backbones.families import DEFAULT_MODEL
from ..errors import UserError
from ..personalize.config import CHECKPOINT_EVERY, TrainConfig
from ..personalize.placeholder import PLACEHOLDER, remove_placeholder
from ..personalize.presets import preset_config
from ..personalize.templates import training_prompt
from . import panels
from .jobs import Job, JobQueue, settings_from_flags, train_flags
from .lock import WorkspaceLock
from .models import Models, available_models, defaults_family, generate, sampling_defaults
from .workspace import MAX_IMAGES, Subject, Workspace, check_uploads, folder_note, sanitize_name

BASE, SUBJECT = "base:", "subject:"  # Generate's choices: the bare model, or a subject's adapter on it
VALIDATIONS_PER_RUN = 4  # validation pictures when the form asks for none in particular
CHECKPOINTS_PER_RUN = 5  # a checkpoint at least every fifth of the run: a resume loses at most a fifth


@dataclass
class TokenboothApp:
    """What one server holds: the workspace on disk, the training queue and the loaded models."""
    workspace: Workspace
    default_model: str = DEFAULT_MODEL
    models: Models = field(default_factory=Models)
    queue: JobQueue | None = None
    lock: WorkspaceLock | None = None  # held while serving: one server per workspace

    def __post_init__(self):
        if self.queue is None:
            self.queue = JobQueue(self.workspace, on_start=self._before_training)

    def _before_training(self, job: Job) -> None:
        if job.model not in BUILTIN:  # a real backbone: the training child needs the memory these hold
            self.models.clear()

    def model_names(self) -> list[str]:
        return available_models(self.default_model)


# --- Personalize -------------------------------------------------------------------------------------------

def training_config(model: str, preset: str, **overrides) -> TrainConfig:
    """The family's training defaults, or the preset's shorter stages, with the form's fields on top."""
    return preset_config(defaults_family(model), preset, **overrides)


def form_defaults(model: str, preset: str) -> tuple:
    """The Advanced fields a backbone and a preset start from: stage 1 steps and lr, stage 2 steps and lr, batch."""
    cfg = training_config(model, preset)
    return cfg.stage1_steps, cfg.stage1_lr, cfg.stage2_steps, cfg.stage2_lr, cfg.batch_size


class CheckedPictures(NamedTuple):
    kept: list[str] | None  # the upload list without the unusable files; None: leave the list as it is
    thumbnails: list[str]
    message: str
    memory: dict  # what the page passes back next time: the list it was just given, and its message


def check_pictures(files: list | None, memory: dict | None = None) -> CheckedPictures:
    """The usable uploads (thumbnails), a message naming each problem, and the upload list with the unusable
    files taken out (the message says so). The pruned list comes back through the upload widget's change
    event: recognised by its file names, it keeps the message that named what was left out."""
    if not files:
        return CheckedPictures(None, [], "", {})
    files = [str(f) for f in files]
    names = [Path(f).name for f in files]
    if memory and names == memory.get("names"):
        return CheckedPictures(None, files, memory["message"], memory)
    checked = check_uploads([Path(f) for f in files])
    kept = [str(f) for f in checked.accepted]
    message = checked.message()
    if len(kept) == len(files):
        return CheckedPictures(None, kept, message, {})
    left_out = [Path(f).name for f in files if f not in kept]
    message += "\n\nLeft out of the list: " + ", ".join(left_out) + "."
    return CheckedPictures(kept, kept, message, {"names": [Path(f).name for f in kept], "message": message})


@dataclass
class AdvancedSettings:
    """The Advanced accordion's fields, in the page's order; empty number fields arrive as None."""
    stage1_steps: float | None
    stage1_lr: float | None
    stage2_steps: float | None
    stage2_lr: float | None
    layers: str
    lora_rank: float | None
    batch_size: float | None
    seed: float | None
    prior_preservation: bool
    validation_every: float | None  # 0 or empty: VALIDATIONS_PER_RUN pictures over the run


def start_training(app: TokenboothApp, files: list | None, class_word: str | None, subject_name: str | None,
                   model: str, preset: str, advanced: AdvancedSettings) -> str:
    """Checks the form, creates the subject's folder with its pictures and queues its training."""
    checked = check_uploads([Path(f) for f in files or []])
    if not checked.ok:
        raise UserError(f"add 1-{MAX_IMAGES} readable pictures first. " + " ".join(checked.problems))
    class_word = (class_word or "").strip()
    if not class_word:
        raise UserError("write the class word (what the subject is: dog, robot, backpack...)")
    a = advanced
    total = int(a.stage1_steps or 0) + int(a.stage2_steps or 0)
    cfg = training_config(
        model, preset, class_name=class_word, stage1_steps=int(a.stage1_steps or 0),
        stage1_lr=float(a.stage1_lr or 0), stage2_steps=int(a.stage2_steps or 0), stage2_lr=float(a.stage2_lr or 0),
        layers=a.layers, lora_rank=int(a.lora_rank or 0), batch_size=int(a.batch_size or 0), seed=int(a.seed or 0),
        prior_preservation=bool(a.prior_preservation),
        validation_prompts=[training_prompt(0, PLACEHOLDER, class_word)],
        validation_steps=int(a.validation_every) if a.validation_every else max(1, total // VALIDATIONS_PER_RUN),
        checkpointing_steps=max(1, min(CHECKPOINT_EVERY, total // CHECKPOINTS_PER_RUN)))
    cfg.validate()
    chosen = (subject_name or "").strip()
    new_name = sanitize_name(chosen) if chosen else app.workspace.free_name(class_word)
    app.workspace.create_subject(new_name, checked.accepted)
    place = app.queue.submit(Job(new_name, model, train_flags(cfg)))
    return (f"**{new_name}**{folder_note(chosen, new_name)}: {_queued_words(place, 'started')} "
            f"({cfg.stage1_steps} + {cfg.stage2_steps} steps on {model}); its progress shows under Training.")


def _queued_words(place: int, verb: str) -> str:
    """When and where a job entered the queue, in the past tense: a message that stays true as the job moves on."""
    at = time.strftime("%H:%M:%S")
    return f"{verb} at {at}" if place == 0 else f"queued at {at} behind {place} training(s)"


def cancel_training(app: TokenboothApp, subject_name: str | None = None) -> str:
    """Cancels the named job, waiting or running (none named: the running one)."""
    if not subject_name:
        job = app.queue.running()
        if job is None:
            raise UserError("no training is running or waiting")
        subject_name = job.name
    was = app.queue.cancel(subject_name)
    at = time.strftime("%H:%M:%S")
    if was == "waiting":
        return f"Took **{subject_name}** out of the queue at {at}; resume it later or delete it in Subjects."
    return (f"Cancelled **{subject_name}** at {at} (it was training; the next waiting one starts): its checkpoints "
            "stay; resume it later or delete it in Subjects.")


def resume_training(app: TokenboothApp, subject_name: str | None) -> str:
    if not subject_name:
        raise UserError("pick an unfinished training")
    place = app.queue.resume(subject_name)
    return f"**{subject_name}**: {_queued_words(place, 'resumed')}."


def cancel_choices(queue: JobQueue) -> list[tuple[str, str]]:
    """(label, name) of every job Cancel can stop: the running one, then the waiting ones in order."""
    running = queue.running()
    choices = [(f"{running.name} (training)", running.name)] if running is not None else []
    return choices + [(f"{j.name} (waiting, number {i} in the queue)", j.name)
                      for i, j in enumerate(queue.waiting(), start=1)]


class RestoredForm(NamedTuple):
    files: list[str]  # the subject's reference pictures, as the workspace holds them
    class_word: str
    subject_name: str
    model: str
    fields: tuple  # stage 1 steps and lr, stage 2 steps and lr, batch: form_defaults' order


def restore_form(app: TokenboothApp) -> RestoredForm | None:
    """What a reloaded page's form shows: the newest queued or running training's pictures and settings (the
    job is the server's, so the form that started it comes back with it); None when nothing is training."""
    queue = app.queue
    active = ([queue.running()] if queue.running() is not None else []) + queue.waiting()
    if not active:
        return None
    job = max(active, key=lambda j: j.created)
    settings = settings_from_flags(job.flags)
    subject = app.workspace.subject(job.name)

    def number(key, kind):
        return kind(settings[key]) if key in settings else None

    fields = (number("stage1_steps", int), number("stage1_lr", float), number("stage2_steps", int),
              number("stage2_lr", float), number("batch_size", int))
    return RestoredForm([str(p) for p in subject.references()], str(settings.get("class_name", "")), job.name,
                        job.model, fields)


def training_status(app: TokenboothApp, seen: dict) -> tuple[dict, dict]:
    """Polled by every open page. Returns the state now (the page passes it back as `seen` next time) and the
    parts that changed since `seen`, as plain values, so the page redraws only those (no flicker):
    "view" the job's HTML, "loss" the loss table, "validation" the captioned pictures, "cancel" the (label, name)
    of the jobs Cancel can stop, "resume" (the unfinished trainings' (label, name), the line offering them)."""
    queue = app.queue
    job = panels.focus_job(queue)
    subject = panels.subject_or_none(app.workspace, job.name) if job is not None else None
    pictures = panels.validation_items(subject)
    unfinished = panels.resume_choices(queue)
    cancellable = cancel_choices(queue)
    now = {"view": panels.job_html(queue, job),
           "loss": (job and job.name, len(subject.loss_records()) if subject else 0),
           "validation": (job and job.name, tuple(p[0] for p in pictures)),
           "cancel": tuple(cancellable),
           "resume": tuple(unfinished)}
    offer = (f"**{len(unfinished)} training(s) stopped before the end.** Each says why and where it would go on "
             "from (its last complete checkpoint, or the start):")
    shown = {"view": lambda: now["view"], "loss": lambda: panels.loss_view(subject), "validation": lambda: pictures,
             "cancel": lambda: cancellable, "resume": lambda: (unfinished, offer)}
    return now, {key: make() for key, make in shown.items() if seen.get(key) != now[key]}


# --- Generate ----------------------------------------------------------------------------------------------

class PageLists(NamedTuple):
    choices: list[tuple[str, str]]  # Generate's (label, value) pairs
    choice: str  # the one selected
    subjects: list[str]  # the Subjects tab's names
    subject: str | None  # the one selected
    known: list[str]  # the Generate values this page has now seen


def generate_choices(app: TokenboothApp) -> list[tuple[str, str]]:
    """The finished subjects, newest first, then the base models."""
    finished = sorted((x for x in app.workspace.subjects() if x.finished), key=lambda x: -x.folder.stat().st_mtime)
    subjects = [(f"{x.name} ({x.model()})", SUBJECT + x.name) for x in finished]
    bases = [(f"base model: {m}", BASE + m) for m in app.model_names()]
    return subjects + bases


def page_lists(app: TokenboothApp, current_choice: str | None, current_subject: str | None,
               known: list[str] | None) -> PageLists:
    """Fresh choices for both tabs' dropdowns; a subject that finished since this page last looked (`known`,
    None before the page's first look) gets selected in Generate."""
    choices = generate_choices(app)
    values = [v for _, v in choices]
    new = [v for v in values if v.startswith(SUBJECT) and known is not None and v not in known]
    choice = new[0] if new else current_choice if current_choice in values else values[0]
    names = [x.name for x in app.workspace.subjects()]
    subject = current_subject if current_subject in names else (names[0] if names else None)
    return PageLists(choices, choice, names, subject, values)


def resolve_choice(app: TokenboothApp, value: str | None) -> tuple[str, Subject | None]:
    """Generate's choice as (the model to load, the subject whose adapter goes on it, or None)."""
    if not value:
        raise UserError("pick a subject or a base model")
    if value.startswith(SUBJECT):
        subject = app.workspace.subject(value[len(SUBJECT):])
        if not subject.finished:
            raise UserError(f"{subject.name} has not finished training")
        return subject.model(), subject
    model = value[len(BASE):]
    if model not in app.model_names():  # only what the page offers: never an arbitrary path from a request
        raise UserError(f"unknown base model {model!r}")
    return model, None


def choice_defaults(app: TokenboothApp, value: str | None) -> tuple[str | None, float, int]:
    """What picking a subject or model sets: the words its insert button adds ("[V] robot"; None for a base
    model, which has no placeholder), and the CFG scale and top-k the form starts from."""
    model, subject = resolve_choice(app, value)
    defaults = sampling_defaults(model, subject)
    return (subject.placeholder_words() if subject else None), defaults.cfg_scale, defaults.image_top_k


def insert_placeholder(app: TokenboothApp, value: str | None, text: str) -> str:
    """The prompt with the subject's words appended ("a [V] robot" when it was empty)."""
    _, subject = resolve_choice(app, value)
    if subject is None:  # the base model has no placeholder
        return text
    words = subject.placeholder_words()
    return f"{text.rstrip()} {words}" if text.strip() else f"a {words}"


class Drawn(NamedTuple):
    captioned: list[tuple[str, str]]  # (PNG, caption) for the gallery
    base: list[str]  # the base model's PNGs, same seed (empty unless side by side)
    downloads: list[str]
    message: str


# The Generate form's base precision: as the subject's adapter trained (a QLoRA subject on its 4-bit base), or
# the named bits for every drawing (`generate --quantize`)
PRECISIONS = {"as trained": None, "full": "none", "int8": "int8", "nf4": "nf4"}


def generate_images(app: TokenboothApp, value: str | None, prompt: str, count: float, seed: float | None,
                    cfg_scale: float | None, top_k: float | None, sampler: str, side_by_side: bool,
                    precision: str = "as trained") -> Drawn:
    """Draws `count` images (and the base model's, when side by side for a subject) into the workspace, on a
    base in `precision` (PRECISIONS)."""
    if precision not in PRECISIONS:
        raise UserError(f"base precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    started = time.monotonic()  # the click's time: loading, both drawings and saving, as the user waits it
    model, subject = resolve_choice(app, value)
    overrides = {"seed": int(seed or 0), "sampler": sampler}
    if cfg_scale is not None:
        overrides["cfg_scale"] = float(cfg_scale)
    if top_k:
        overrides["image_top_k"] = int(top_k)
    quantize = PRECISIONS[precision]
    paths, settings = generate(app.models, app.workspace, model, subject, prompt, int(count), overrides, quantize)
    quantize = settings["quantize"]  # the side-by-side base is drawn on the same bits
    base_paths, drawing = [], f"drawing {settings['seconds']}s"
    if side_by_side and subject is not None:
        plain = remove_placeholder(prompt, subject.run_config().get("placeholder", PLACEHOLDER))  # the base model's
        base_paths, base_settings = generate(app.models, app.workspace, model, None, plain, int(count), overrides,
                                             quantize)
        drawing = f"drawing {settings['seconds']}s, and {base_settings['seconds']}s for the base model's"
    captioned = [(str(p), f"seed {settings['seed']} #{i}") for i, p in enumerate(paths)]
    base_words = f" and the base model's {len(base_paths)}" if base_paths else ""
    message = (f"{len(paths)} image(s) of *{prompt}*{base_words} in {time.monotonic() - started:.1f}s ({drawing}): "
               f"seed {settings['seed']}, CFG {settings['cfg_scale']}, top-k {settings['image_top_k']}, "
               f"{settings['sampler']} sampler" + (f", base in {quantize}." if quantize != "none" else "."))
    return Drawn(captioned, [str(p) for p in base_paths], [str(p) for p in paths + base_paths], message)


# --- Subjects ----------------------------------------------------------------------------------------------

def subject_details(app: TokenboothApp, subject_name: str | None) -> tuple[list[str], str, object, list]:
    """The Subjects tab's view of one subject: its reference pictures, a summary, its loss table and its
    validation pictures (with no subject yet: where subjects come from)."""
    if not subject_name:
        return [], "No subject yet: train one in Personalize, or point `tokenbooth train --output` at " \
                   f"`{app.workspace.subjects_dir}/NAME`.", panels.loss_view(None), []
    subject = app.workspace.subject(subject_name)
    return ([str(p) for p in subject.references()], panels.subject_summary(subject, app.queue),
            panels.loss_view(subject), panels.validation_items(subject))


def _refuse_if_active(app: TokenboothApp, subject_name: str, waiting_ok: bool = False) -> None:
    running = app.queue.running()
    if running is not None and running.name == subject_name:
        raise UserError(f"{subject_name} is training; cancel it first (Personalize: Cancel)")
    if not waiting_ok and app.queue.active(subject_name):
        raise UserError(f"{subject_name} is waiting in the queue; take it out first (Personalize: Cancel)")


def rename_subject(app: TokenboothApp, subject_name: str, wanted: str) -> tuple[list[str], str, str]:
    """Renames a subject that is not queued or training; returns the subjects' names, its new folder name
    and a message (which says the folder name when it is not what was typed)."""
    _refuse_if_active(app, subject_name)
    renamed = app.workspace.rename(subject_name, wanted)
    names = [x.name for x in app.workspace.subjects()]
    return names, renamed, f"Renamed {subject_name} to **{renamed}**{folder_note(wanted, renamed)}."


def ask_to_delete(app: TokenboothApp, subject_name: str) -> str:
    """The question before a delete, for a subject that exists."""
    app.workspace.subject(subject_name)
    running = app.queue.running()
    waiting = app.queue.active(subject_name) and (running is None or running.name != subject_name)
    note = " It is waiting in the queue: it leaves the queue too." if waiting else ""
    return f"Delete **{subject_name}** and all its files? This cannot be undone.{note}"


def delete_subject(app: TokenboothApp, subject_name: str) -> tuple[list[str], str]:
    """Deletes a subject that is not training (a waiting one leaves the queue first); returns the remaining
    names and a message."""
    _refuse_if_active(app, subject_name, waiting_ok=True)
    note = ""
    if app.queue.active(subject_name):
        app.queue.cancel(subject_name)
        note = " (taken out of the queue first)"
    app.workspace.delete(subject_name)
    return [x.name for x in app.workspace.subjects()], f"Deleted **{subject_name}**{note}."


def zip_subject(app: TokenboothApp, subject_name: str) -> tuple[Path, str]:
    path = app.workspace.export_zip(subject_name)
    return path, f"{path.name}: {path.stat().st_size / 2**20:.1f} MB"
