"""What the page shows, as plain values (HTML strings, tables, lists of files) built from the workspace and
the queue; app.py only places them. Kept apart from Gradio so they are easy to read and to test."""

from __future__ import annotations

import html
import json

from ..errors import UserError
from .jobs import Job, JobQueue
from .progress import format_seconds, stage_progress
from .workspace import Subject, Workspace

STAGE_TITLES = {"embedding": "stage 1: the [V] embedding", "layers": "stage 2: [V] and the layers",
                "joint": "both at once (joint)"}
STAGE_COLORS = {"embedding": "#2563eb", "layers": "#ea580c", "joint": "#7c3aed"}
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


def job_html(queue: JobQueue, job: Job | None) -> str:
    waiting = queue.waiting()
    parts = []
    if job is None:
        parts.append("<p class='tb-muted'>No training yet: drop pictures above and press Start.</p>")
    else:
        subject = subject_or_none(queue.workspace, job.name)
        parts.append(f"<h3 class='tb-job-title'>{html.escape(job.name)}: "
                     f"<span class='tb-state tb-{job.state}'>{STATE_WORDS.get(job.state, job.state)}</span></h3>")
        if job.error:
            parts.append(f"<div class='tb-error'><b>Error:</b> {html.escape(job.error)}</div>")
        if subject is not None:
            stages = stage_progress(subject.run_config(), subject.loss_records())
            if job.state == "running" and not any(s.done for s in stages):
                parts.append("<p class='tb-muted'>Loading the model and tokenizing the pictures...</p>")
            elif job.state == "running" and all(s.done == s.total for s in stages):
                parts.append("<p class='tb-muted'>Writing the adapter and the final validation picture...</p>")
            for s in stages:
                left = "" if s.done == s.total else f", {format_seconds(s.seconds_left)} left"
                title = STAGE_TITLES.get(s.stage, s.stage)
                parts.append(f"<div class='tb-stage'><div class='tb-stage-label'>{title}: {s.done}/{s.total} steps"
                             f"{left if job.state == 'running' else ''}</div><div class='tb-bar'>"
                             f"<div class='tb-fill' style='width:{100 * s.fraction:.1f}%'></div></div></div>")
    if waiting:
        items = "".join(f"<li>{html.escape(j.name)} ({j.model})</li>" for j in waiting)
        parts.append(f"<div class='tb-queue'><b>Waiting, in order:</b><ol>{items}</ol></div>")
    return "\n".join(parts)


def loss_table(subject: Subject | None):
    """step, loss, stage: what the loss plot draws (None when there is nothing yet: an empty table would leave
    Gradio's plot stuck with an empty legend)."""
    import pandas as pd

    records = subject.loss_records() if subject is not None else []
    if not records:
        return None
    return pd.DataFrame({"step": [r["step"] for r in records], "loss": [r["loss"] for r in records],
                         "stage": [r.get("stage", "") for r in records]})


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
    """Markdown: what the subject is, how far its training got, its settings."""
    job = Job.load(queue.workspace, subject.name)
    cfg = subject.run_config()
    if subject.finished:
        state = "finished adapter"
    elif job is not None:
        state = STATE_WORDS.get(job.state, job.state)
    else:
        state = "unfinished `tokenbooth train` run"
    records = subject.loss_records()
    lines = [f"**{subject.name}**: {state}" + (f", {len(records)} steps logged" if records else "") + ".",
             "", f"Prompt with `{subject.placeholder_words()}`.", ""]
    if job is not None and job.error:
        lines += [f"Error: {job.error}", ""]
    shown = {"backbone": subject.model(), **cfg}
    cells = [(k, shown[k] if isinstance(shown[k], str) else json.dumps(shown[k])) for k in SETTINGS_SHOWN if k in shown]
    half = (len(cells) + 1) // 2  # two settings per row: the table stays short
    lines += ["| setting | value | setting | value |", "|---|---|---|---|"]
    for left, right in zip(cells[:half], cells[half:] + [("", "")]):
        lines.append(f"| {left[0]} | {left[1]} | {right[0]} | {right[1]} |")
    return "\n".join(lines)


def subject_or_none(workspace: Workspace, name: str) -> Subject | None:
    try:
        return workspace.subject(name)
    except UserError:
        return None
