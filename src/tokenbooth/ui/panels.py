"""What the page shows, as plain values (HTML strings, tables, lists of files) built from the workspace and
the queue; app.py only places them. Kept apart from Gradio so they are easy to read and to test."""

from __future__ import annotations

import html
import json
import time

from ..errors import UserError
from ..personalize.config import JOINT, STAGE1, STAGE2
from ..personalize.placeholder import PLACEHOLDER
from .jobs import UNFINISHED, Job, JobQueue, checkpoint_step, settings_from_flags
from .progress import StageProgress, drawing_picture, format_seconds, records_of_this_run, stage_progress
from .workspace import Subject, Workspace

STAGE_TITLES = {STAGE1: f"stage 1: the {PLACEHOLDER} embedding", STAGE2: f"stage 2: {PLACEHOLDER} and the layers",
                JOINT: "both at once (joint)"}
STAGE_COLORS = {STAGE1: "#2563eb", STAGE2: "#ea580c", JOINT: "#7c3aed"}
STATE_WORDS = {"queued": "waiting in the queue", "running": "training", "done": "finished", "failed": "failed",
               "cancelled": "cancelled", "interrupted": "interrupted (the server stopped)"}
SETTINGS_SHOWN = ("backbone", "class_name", "placeholder", "stages", "layers", "lora_rank", "stage1_steps",
                  "stage1_lr", "stage2_steps", "stage2_lr", "batch_size", "prior_preservation", "seed")


def focus_job(queue: JobQueue) -> Job | None:
    """The job the Personalize tab shows: the running one, else the last one to end (its result or error stays
    in view; the waiting ones are listed below it), else the newest."""
    running = queue.running()
    if running is not None:
        return Job.load(queue.workspace, running.name) or running
    jobs = [j for j in (Job.load(queue.workspace, s.name) for s in queue.workspace.subjects()) if j is not None]
    ended = [j for j in jobs if j.state != "queued"]
    return max(ended or jobs, key=lambda j: j.finished or j.started or j.created, default=None)


def job_html(queue: JobQueue, job: Job | None, now: float | None = None) -> str:
    waiting = queue.waiting()
    parts = []
    if job is None:
        parts.append("<p class='tb-muted'>No training yet: drop pictures above and press Start.</p>")
    else:
        parts.append(f"<h3 class='tb-job-title'>{html.escape(job.name)}: "
                     f"<span class='tb-state tb-{job.state}'>{STATE_WORDS.get(job.state, job.state)}</span></h3>")
        if job.error:
            parts.append(f"<div class='tb-error'><b>Error:</b> {html.escape(job.error)}</div>")
        subject = subject_or_none(queue.workspace, job.name)
        if subject is not None:
            parts += _progress_parts(subject, job, time.time() if now is None else now)
    if waiting:
        items = "".join(f"<li>{html.escape(j.name)} ({j.model})</li>" for j in waiting)
        parts.append(f"<div class='tb-queue'><b>Waiting, in order:</b><ol>{items}</ol></div>")
    return "\n".join(parts)


def _progress_parts(subject: Subject, job: Job, now: float) -> list[str]:
    """A bar per stage with its steps and, while it trains, what it does now and the time left."""
    running, run_config = job.state == "running", subject.run_config()
    written = subject.log_written()
    resume_step = checkpoint_step(subject.folder)
    records = records_of_this_run(subject.loss_records(), written, job.started if running else None, resume_step)
    # a resumed run that has not yet cut its log back is still loading: nothing of it is timed yet
    loading = running and (written is None or (job.started is not None and written < job.started))
    stages = stage_progress(run_config, records, None if loading or not running else now - written)
    parts = []
    if loading and records:
        parts.append(f"<p class='tb-muted'>Loading the model to go on from its checkpoint at step {resume_step}..."
                     "</p>")
    elif running and not any(s.done for s in stages):
        parts.append("<p class='tb-muted'>Loading the model and tokenizing the pictures...</p>")
    elif running and all(s.done == s.total for s in stages):
        parts.append("<p class='tb-muted'>Writing the adapter and the final validation picture...</p>")
    elif running and drawing_picture(run_config, records):
        parts.append(f"<p class='tb-muted'>Drawing the validation picture of step {len(records)}...</p>")
    elif job.state in UNFINISHED:
        parts.append(f"<p class='tb-muted'>{html.escape(resume_words(resume_step))}</p>")
    first_open = next((s for s in stages if s.done < s.total), None)
    for s in stages:
        left = time_left_words(s, s is first_open) if running else ""
        title = STAGE_TITLES.get(s.stage, s.stage)
        parts.append(f"<div class='tb-stage'><div class='tb-stage-label'>{title}: {s.done}/{s.total} steps"
                     f"{left}</div><div class='tb-bar'>"
                     f"<div class='tb-fill' style='width:{100 * s.fraction:.1f}%'></div></div></div>")
    return parts


def time_left_words(stage: StageProgress, current: bool) -> str:
    if stage.done == stage.total:
        return ""
    if stage.seconds_left is None:  # no step timed yet: nothing to estimate from
        return ", starting" if current else ""
    return f", {'at least ' if stage.at_least else ''}{format_seconds(stage.seconds_left)} left"


def resume_words(step: int | None) -> str:
    """What resuming an unfinished training does, from its last checkpoint's step (None: it has none)."""
    if step is None:
        return "It stopped before its first checkpoint: resuming starts it over."
    return f"Resuming goes on from its checkpoint at step {step}."


def resume_choices(queue: JobQueue) -> list[tuple[str, str]]:
    """(label, name) of each unfinished training: why it stopped and where a resume starts; the ones that
    stopped by themselves (interrupted, failed) before the ones a user cancelled."""
    jobs = [Job.load(queue.workspace, name) for name in queue.unfinished()]
    jobs = sorted((j for j in jobs if j is not None), key=lambda j: j.state == "cancelled")
    choices = []
    for j in jobs:
        step = checkpoint_step(queue.workspace.subject_folder(j.name))
        where = "starts over" if step is None else f"from step {step}"
        choices.append((f"{j.name}: {STATE_WORDS.get(j.state, j.state)}, {where}", j.name))
    return choices


def loss_svg(records: list[dict], width: int = 560, height: int = 230) -> str:
    """The loss curve as inline SVG, a line per stage in its colour: drawn by the browser with no script
    (Gradio's plot measured its chart from a script, and threw "reading 'offsetWidth'" page errors when a
    subject with no loss yet removed that chart), and a sentence instead of a bare icon before the first step."""
    if not records:
        return "<p class='tb-muted tb-loss-empty'>The loss curve appears here with the first training step.</p>"
    left, right, top, bottom = 48, 12, 26, 30
    steps, losses = [r["step"] for r in records], [r["loss"] for r in records]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(max(losses), min(losses) + 1e-6)

    def point(r):
        x = left + (r["step"] - x0) / (x1 - x0) * (width - left - right)
        y = top + (y1 - r["loss"]) / (y1 - y0) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    lines, legend, stages = [], [], list(dict.fromkeys(r.get("stage", "") for r in records))
    for i, stage in enumerate(stages):
        color = STAGE_COLORS.get(stage, "#374151")
        points = " ".join(point(r) for r in records if r.get("stage", "") == stage)
        lines.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{points}'/>")
        legend.append(f"<text x='{left + 150 * i + 14}' y='14' font-size='12'>{html.escape(stage)}</text>"
                      f"<rect x='{left + 150 * i}' y='5' width='10' height='10' fill='{color}'/>")
    axes = (f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#9ca3af'/>"
            f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#9ca3af'/>"
            f"<text x='{left - 4}' y='{top + 4}' font-size='11' text-anchor='end'>{y1:.3g}</text>"
            f"<text x='{left - 4}' y='{height - bottom}' font-size='11' text-anchor='end'>{y0:.3g}</text>"
            f"<text x='{left}' y='{height - 12}' font-size='11'>step {x0}</text>"
            f"<text x='{width - right}' y='{height - 12}' font-size='11' text-anchor='end'>step {max(steps)}</text>")
    return (f"<svg class='tb-loss' viewBox='0 0 {width} {height}' width='100%' role='img' "
            f"aria-label='training loss by step'>{axes}{''.join(lines)}{''.join(legend)}</svg>")


def loss_view(subject: Subject | None) -> str:
    """The loss plot's HTML for a subject (or none)."""
    return loss_svg(subject.loss_records() if subject is not None else [])


def validation_items(subject: Subject | None) -> list[tuple[str, str]]:
    """(picture, caption): its step, and its fidelity to the references where the run scored it."""
    if subject is None:
        return []
    scored = {"final" if r.get("stage") == "final" else f"step {r['step']}": r for r in subject.fidelity_records()}
    items = []
    for p in subject.validation_images():
        label = "final" if p.stem == "final" else f"step {p.stem.split('-')[1]}"
        record = scored.get(label)
        items.append((str(p), label if record is None else f"{label}: fidelity {record['fidelity']:.3f} "
                                                           f"({record['encoder']})"))
    return items


def subject_summary(subject: Subject, queue: JobQueue) -> str:
    """Markdown: what the subject is, how far its training got, its settings (the job's, for a training
    stopped before it wrote train_config.json)."""
    job = Job.load(queue.workspace, subject.name)
    cfg = subject.run_config() or (settings_from_flags(job.flags) if job is not None else {})
    records = subject.loss_records()
    if subject.finished:
        state = "finished adapter"
    elif job is not None:
        state = STATE_WORDS.get(job.state, job.state)
    else:
        state = "unfinished `tokenbooth train` run"
    total = _int_or_none(cfg.get("stage1_steps")), _int_or_none(cfg.get("stage2_steps"))
    of = f" of {total[0] + total[1]}" if None not in total else ""
    words = " ".join(str(w) for w in (cfg.get("placeholder", PLACEHOLDER), cfg.get("class_name")) if w)
    lines = [f"**{subject.name}**: {state}" + (f", {len(records)}{of} steps logged" if records else "") + ".",
             "", f"Prompt with `{words}`.", ""]
    if job is not None and job.state in UNFINISHED and not subject.finished:
        lines += [resume_words(checkpoint_step(subject.folder)), ""]
    if job is not None and job.error:
        lines += [f"Error: {job.error}", ""]
    shown = {"backbone": subject.model(), **cfg}
    cells = [(k, shown[k] if isinstance(shown[k], str) else json.dumps(shown[k])) for k in SETTINGS_SHOWN if k in shown]
    half = (len(cells) + 1) // 2  # two settings per row: the table stays short
    lines += ["| setting | value | setting | value |", "|---|---|---|---|"]
    for left, right in zip(cells[:half], cells[half:] + [("", "")]):
        lines.append(f"| {left[0]} | {left[1]} | {right[0]} | {right[1]} |")
    return "\n".join(lines)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def subject_or_none(workspace: Workspace, name: str) -> Subject | None:
    try:
        return workspace.subject(name)
    except UserError:
        return None
