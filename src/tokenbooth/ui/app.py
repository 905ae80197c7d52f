"""The page: three tabs (Personalize, Generate, Subjects) wired to the workspace, the job queue and the models.

Every number the forms start from comes from the family tables (`TrainConfig.for_family`,
`SamplingConfig.for_family`); training is `tokenbooth train` in a child process (jobs.py); drawing is
`sampling.draw` (models.py). This file only lays out components and turns clicks into those calls.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..personalize.recipe import TrainConfig
from ..personalize.templates import training_prompt
from . import panels
from .jobs import Job, JobQueue, train_flags
from .models import Models, available_models, base_prompt, family_of, generate, sampling_defaults
from .workspace import MAX_IMAGE_BYTES, MAX_IMAGES, Workspace, check_uploads, sanitize_name

log = logging.getLogger("tokenbooth.ui")

QUICK_FRACTION = 5  # the "quick" recipe: a fifth of the family's steps, a first look in a fifth of the time
PRESETS = ("family defaults", "quick")
POLL_SECONDS = 1.0  # how often a page asks for the job's state
BASE, SUBJECT = "base:", "subject:"  # Generate's choices: the bare model, or a subject's adapter on it

CSS = """
.tb-bar {background: #e5e7eb; border-radius: 6px; height: 14px; overflow: hidden;}
.tb-fill {background: #2563eb; height: 100%; transition: width .4s;}
.tb-stage {margin: 6px 0 10px 0;}
.tb-stage-label {font-size: 0.95em; margin-bottom: 3px;}
.tb-error {background: #fee2e2; border: 1px solid #ef4444; padding: 8px 10px; border-radius: 6px; margin: 6px 0;}
.tb-muted {color: #6b7280;}
.tb-state.tb-done {color: #15803d;} .tb-state.tb-failed {color: #b91c1c;} .tb-state.tb-running {color: #1d4ed8;}
#thumbs img, #validation img, #gallery img, #base-gallery img, #subject-refs img, #subject-validation img
  {image-rendering: pixelated;}
"""


@dataclass
class TokenboothApp:
    """What one server holds: the workspace on disk, the training queue and the loaded models."""
    workspace: Workspace
    default_model: str = "mini"
    models: Models = field(default_factory=Models)
    queue: JobQueue | None = None

    def __post_init__(self):
        if self.queue is None:
            self.queue = JobQueue(self.workspace, on_start=self._before_training)

    def _before_training(self, job: Job) -> None:
        from ..backbones import BUILTIN

        if job.model not in BUILTIN:  # a real backbone: the training child needs the memory these hold
            self.models.clear()

    def model_names(self) -> list[str]:
        return available_models(self.default_model)


def recipe(model: str, preset: str, **overrides) -> TrainConfig:
    """The family's training defaults, or the quick preset's shorter stages, with the form's fields on top."""
    family = family_of(model) or "lumina-mgpt"
    base = TrainConfig.for_family(family)
    quick = {} if preset != "quick" else {"stage1_steps": max(1, base.stage1_steps // QUICK_FRACTION),
                                          "stage2_steps": max(1, base.stage2_steps // QUICK_FRACTION)}
    return TrainConfig.for_family(family, **{**quick, **overrides})


def _friendly(fn, n_outputs: int = 1):
    """Runs a handler; a UserError (or any bug) becomes a message in the handler's last output, the others stay
    as they are, and the server keeps serving."""
    import gradio as gr

    def wrapper(*args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the page must say what broke, whatever it is
            if not isinstance(e, UserError):
                log.error("handler %s failed:\n%s", fn.__name__, traceback.format_exc())
            text = f"**Error:** {e}" if isinstance(e, UserError) else f"**Error:** {e.__class__.__name__}: {e}"
            return text if n_outputs == 1 else (*[gr.skip()] * (n_outputs - 1), text)
    wrapper.__name__ = fn.__name__
    return wrapper


def build(app: TokenboothApp):
    import gradio as gr

    ws = app.workspace
    with gr.Blocks(title="tokenbooth", analytics_enabled=False) as demo:
        gr.Markdown("## tokenbooth\nTeach an auto-regressive text-to-image model a new subject from a few "
                    "pictures, then draw it anywhere: *a [V] robot on the beach*.")
        with gr.Tabs():
            with gr.Tab("Personalize", id="personalize", elem_id="tab-personalize"):
                p = _personalize_tab(app)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as gen_tab:
                g = _generate_tab(app)
            with gr.Tab("Subjects", id="subjects", elem_id="tab-subjects") as subj_tab:
                s = _subjects_tab(app)

        def generate_choices():
            finished = sorted((x for x in ws.subjects() if x.finished), key=lambda x: -x.folder.stat().st_mtime)
            subjects = [(f"{x.name} ({x.model()})", SUBJECT + x.name) for x in finished]  # newest first
            bases = [(f"base model: {m}", BASE + m) for m in app.model_names()]
            return subjects + bases

        def refresh_lists(current_gen, current_subject, known):
            """Fresh choices; a subject that finished since this page last looked gets selected."""
            choices = generate_choices()
            values = [v for _, v in choices]
            new = [v for v in values if v.startswith(SUBJECT) and known is not None and v not in known]
            gen_value = new[0] if new else current_gen if current_gen in values else values[0]
            names = [x.name for x in ws.subjects()]
            subject_value = current_subject if current_subject in names else (names[0] if names else None)
            return (gr.Dropdown(choices=choices, value=gen_value), gr.Dropdown(choices=names, value=subject_value),
                    values)

        known = gr.State(None)  # the Generate choices this page has seen (None: not loaded yet)
        lists = dict(fn=refresh_lists, inputs=[g["choice"], s["name"], known],
                     outputs=[g["choice"], s["name"], known], show_progress="hidden")
        demo.load(**lists)
        gen_tab.select(**lists)
        subj_tab.select(**lists).then(**s["show"])  # the same name may have changed since: training ended
        demo.load(p["fill"], inputs=[p["model"], p["preset"]], outputs=p["fields"], show_progress="hidden")
    return demo


# --- Personalize -------------------------------------------------------------------------------------------

def _personalize_tab(app: TokenboothApp) -> dict:
    import gradio as gr

    ws, queue = app.workspace, app.queue
    models = app.model_names()
    with gr.Row():
        with gr.Column(scale=1):
            uploads = gr.File(label=f"Reference pictures of your subject (1-{MAX_IMAGES}, up to "
                                    f"{MAX_IMAGE_BYTES // 2**20} MB each)", file_count="multiple",
                              elem_id="references")
            thumbs = gr.Gallery(label="Thumbnails", columns=5, height=170, object_fit="contain", elem_id="thumbs",
                                interactive=False)
            upload_msg = gr.Markdown(elem_id="upload-message")
        with gr.Column(scale=1):
            with gr.Row():
                class_word = gr.Textbox(label="Class word", placeholder="robot, dog, backpack...",
                                        info="what the subject is: prompts say \"[V] robot\"", elem_id="class-word")
                name = gr.Textbox(label="Subject name", placeholder="the class word", elem_id="subject-name",
                                  info="its folder in the workspace")
            with gr.Row():
                model = gr.Dropdown(models, value=app.default_model, label="Backbone", elem_id="backbone",
                                    info="mini always; real ones when their files are on disk")
                preset = gr.Radio(list(PRESETS), value=PRESETS[0], label="Recipe", elem_id="preset",
                                  info=f"quick: 1/{QUICK_FRACTION} of the steps, for trying")
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                with gr.Row():
                    s1 = gr.Number(label="Stage 1 steps ([V] only)", precision=0, minimum=1, elem_id="stage1-steps")
                    lr1 = gr.Number(label="Stage 1 learning rate", elem_id="stage1-lr")
                with gr.Row():
                    s2 = gr.Number(label="Stage 2 steps ([V] + layers)", precision=0, minimum=1,
                                   elem_id="stage2-steps")
                    lr2 = gr.Number(label="Stage 2 learning rate", elem_id="stage2-lr")
                with gr.Row():
                    layers = gr.Radio(["qkv", "lora"], value="qkv", label="Stage 2 trains",
                                      info="qkv: every layer's Q/K/V (the paper); lora: low-rank adapters")
                    rank = gr.Number(value=4, label="LoRA rank", precision=0, minimum=1)
                with gr.Row():
                    batch = gr.Number(label="Batch size", precision=0, minimum=1)
                    seed = gr.Number(value=0, label="Seed", precision=0)
                with gr.Row():
                    prior = gr.Checkbox(label="Prior preservation (DreamBooth's class images)")
                    val_every = gr.Number(value=0, label="Validation picture every N steps (0 = four per run)",
                                          precision=0, minimum=0)
            start = gr.Button("Start training", variant="primary", elem_id="start")
            start_msg = gr.Markdown(elem_id="start-message")

    gr.Markdown("### Training")
    with gr.Group(visible=False, elem_id="resume-offer") as resume_group:
        resume_note = gr.Markdown()
        with gr.Row():
            resume_name = gr.Dropdown(label="Unfinished training", elem_id="resume-name", scale=3)
            resume = gr.Button("Resume from its last checkpoint", elem_id="resume", scale=1)
    job_view = gr.HTML(elem_id="job-status")
    with gr.Row():
        loss_plot = gr.LinePlot(None, x="step", y="loss", color="stage", color_map=panels.STAGE_COLORS,
                                title="Training loss", height=260, elem_id="loss-plot")
        validation = gr.Gallery(label="Validation pictures ([V] as it learns)", columns=5, height=260,
                                fit_columns=False, object_fit="contain", elem_id="validation")
    cancel = gr.Button("Cancel training", variant="stop", visible=False, elem_id="cancel")
    job_msg = gr.Markdown(elem_id="job-message")

    fields = [s1, lr1, s2, lr2, batch]

    def fill(model_name, preset_name):
        cfg = recipe(model_name, preset_name)
        return cfg.stage1_steps, cfg.stage1_lr, cfg.stage2_steps, cfg.stage2_lr, cfg.batch_size

    def on_upload(files):
        if not files:
            return [], ""
        checked = check_uploads([Path(f) for f in files])
        return [str(f) for f in checked.accepted], checked.message()

    def on_start(files, cls, subject_name, model_name, preset_name, st1, l1, st2, l2, lay, r, b, sd, pr, ve):
        checked = check_uploads([Path(f) for f in files or []])
        if not checked.ok:
            raise UserError("add 1-10 readable pictures first. " + " ".join(checked.problems))
        cls = (cls or "").strip()
        if not cls:
            raise UserError("write the class word (what the subject is: dog, robot, backpack...)")
        total = int(st1 or 0) + int(st2 or 0)
        cfg = recipe(model_name, preset_name, class_name=cls, stage1_steps=int(st1 or 0), stage1_lr=float(l1 or 0),
                     stage2_steps=int(st2 or 0), stage2_lr=float(l2 or 0), layers=lay, lora_rank=int(r or 0),
                     batch_size=int(b or 0), seed=int(sd or 0), prior_preservation=bool(pr),
                     validation_prompts=[training_prompt(0, TrainConfig.placeholder, cls)],
                     validation_steps=int(ve) if ve else max(1, total // 4),
                     checkpointing_steps=max(1, min(50, total // 5)))  # a resume loses at most a fifth of the run
        cfg.validate()
        chosen = (subject_name or "").strip()
        new_name = sanitize_name(chosen) if chosen else ws.free_name(cls)
        ws.create_subject(new_name, checked.accepted)
        place = queue.submit(Job(new_name, model_name, train_flags(cfg)))
        where = "training now" if place == 0 else f"waiting, number {place} in the queue"
        return f"**{new_name}**: {where} ({cfg.stage1_steps} + {cfg.stage2_steps} steps on {model_name})."

    def on_cancel():
        job = queue.running()
        if job is None:
            raise UserError("no training is running")
        queue.cancel(job.name)
        return f"Cancelling {job.name}: its checkpoints stay; resume it later or delete it in Subjects."

    def on_resume(subject_name):
        if not subject_name:
            raise UserError("pick an unfinished training")
        place = queue.resume(subject_name)
        return f"**{subject_name}**: " + ("resuming now." if place == 0 else f"waiting, number {place} in the queue.")

    def refresh(seen):
        """Called every POLL_SECONDS by every open page; outputs that did not change are skipped (no flicker)."""
        job = panels.focus_job(queue)
        subject = panels.subject_or_none(ws, job.name) if job is not None else None
        vals = panels.validation_items(subject)
        unfinished = queue.unfinished()
        now = {"view": panels.job_html(queue, job),
               "loss": (job and job.name, len(subject.loss_records()) if subject else 0),
               "validation": (job and job.name, tuple(v[0] for v in vals)),
               "cancel": queue.running() is not None,
               "resume": tuple(unfinished)}
        offer = (f"**{len(unfinished)} training(s) stopped before the end** ({', '.join(unfinished)}). "
                 "Resume one from its last complete checkpoint:")

        def unless_same(key, make):
            return make() if seen.get(key) != now[key] else gr.skip()

        return (now,
                unless_same("view", lambda: now["view"]),
                unless_same("loss", lambda: panels.loss_table(subject)),
                unless_same("validation", lambda: vals),
                unless_same("cancel", lambda: gr.Button(visible=now["cancel"])),
                unless_same("resume", lambda: gr.Group(visible=bool(unfinished))),
                unless_same("resume", lambda: gr.Dropdown(choices=unfinished, value=(unfinished or [None])[0])),
                unless_same("resume", lambda: offer))

    seen = gr.State({})
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(refresh, inputs=seen, outputs=[seen, job_view, loss_plot, validation, cancel, resume_group,
                                              resume_name, resume_note],
               show_progress="hidden", concurrency_limit=None, queue=False)
    uploads.change(_friendly(on_upload, 2), uploads, [thumbs, upload_msg], show_progress="hidden")
    for control in (model, preset):
        control.change(fill, [model, preset], fields, show_progress="hidden")
    start.click(_friendly(on_start), [uploads, class_word, name, model, preset, s1, lr1, s2, lr2, layers, rank,
                                      batch, seed, prior, val_every], start_msg)
    cancel.click(_friendly(on_cancel), None, job_msg)
    resume.click(_friendly(on_resume), resume_name, job_msg)
    return {"fill": fill, "model": model, "preset": preset, "fields": fields}


# --- Generate ----------------------------------------------------------------------------------------------

def _generate_tab(app: TokenboothApp) -> dict:
    import gradio as gr

    ws = app.workspace
    with gr.Row():
        with gr.Column(scale=1):
            choice = gr.Dropdown(label="Subject (or the base model)", elem_id="gen-subject")
            prompt = gr.Textbox(label="Prompt", placeholder="a [V] robot on the beach", lines=2, elem_id="prompt")
            insert = gr.Button("Insert [V]", size="sm", elem_id="insert-v")
            with gr.Row():
                n = gr.Slider(1, 8, value=4, step=1, label="Images", elem_id="num-images")
                seed = gr.Number(value=0, label="Seed", precision=0, elem_id="gen-seed")
            with gr.Row():
                cfg = gr.Number(label="CFG scale", info="classifier-free guidance", elem_id="cfg")
                top_k = gr.Number(label="Top-k", precision=0, minimum=1, elem_id="top-k")
            sampler = gr.Radio(["plain", "sjd"], value="plain", label="Sampler",
                               info="sjd: speculative Jacobi decoding, the same distribution in fewer passes")
            compare = gr.Checkbox(label="Also draw the base model with the same seed, side by side",
                                  elem_id="compare")
            go = gr.Button("Generate", variant="primary", elem_id="generate")
            msg = gr.Markdown(elem_id="gen-message")
        with gr.Column(scale=2):
            with gr.Row():
                gallery = gr.Gallery(label="Drawn", columns=4, height=330, object_fit="contain", elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                base_gallery = gr.Gallery(label="Base model, same seed", columns=4, height=330, visible=False,
                                          object_fit="contain", elem_id="base-gallery",
                                          buttons=["download", "fullscreen"])
            files = gr.File(label="Downloads: each PNG carries its settings (text chunk 'tokenbooth')",
                            file_count="multiple", interactive=False, elem_id="downloads")

    def resolve(value):
        if not value:
            raise UserError("pick a subject or a base model")
        if value.startswith(SUBJECT):
            subject = ws.subject(value[len(SUBJECT):])
            if not subject.finished:
                raise UserError(f"{subject.name} has not finished training")
            return subject.model(), subject
        model = value[len(BASE):]
        if model not in app.model_names():  # only what the page offers: never an arbitrary path from a request
            raise UserError(f"unknown base model {model!r}")
        return model, None

    def on_choice(value):
        model, subject = resolve(value)
        defaults = sampling_defaults(model, subject)
        words = subject.placeholder_words() if subject else None
        return (gr.Button(f"Insert {words}", visible=True) if words else gr.Button(visible=False),
                defaults.cfg_scale, defaults.image_top_k, "")

    def on_insert(value, text):
        _, subject = resolve(value)
        if subject is None:  # the base model has no [V]
            return text
        words = subject.placeholder_words()
        return f"{text.rstrip()} {words}" if text.strip() else f"a {words}"

    def on_generate(value, text, count, sd, scale, k, which, side_by_side):
        model, subject = resolve(value)
        overrides = {"seed": int(sd or 0), "sampler": which}
        if scale is not None:
            overrides["cfg_scale"] = float(scale)
        if k:
            overrides["image_top_k"] = int(k)
        paths, settings = generate(app.models, ws, model, subject, text, int(count), overrides)
        base_paths = []
        if side_by_side and subject is not None:
            plain = base_prompt(text, subject.run_config().get("placeholder", "[V]"))
            base_paths, _ = generate(app.models, ws, model, None, plain, int(count), overrides)
        caption = [(str(p), f"seed {settings['seed']} #{i}") for i, p in enumerate(paths)]
        done = (f"{len(paths)} image(s) of *{text}* in {settings['seconds']}s: seed {settings['seed']}, "
                f"CFG {settings['cfg_scale']}, top-k {settings['image_top_k']}, {settings['sampler']} sampler.")
        return (caption, gr.Gallery(value=[str(p) for p in base_paths], visible=bool(base_paths)),
                [str(p) for p in paths + base_paths], done)

    choice.change(_friendly(on_choice, 4), choice, [insert, cfg, top_k, msg], show_progress="hidden")
    insert.click(on_insert, [choice, prompt], prompt, show_progress="hidden")
    go.click(_friendly(on_generate, 4), [choice, prompt, n, seed, cfg, top_k, sampler, compare],
             [gallery, base_gallery, files, msg])
    return {"choice": choice}


# --- Subjects ----------------------------------------------------------------------------------------------

def _subjects_tab(app: TokenboothApp) -> dict:
    import gradio as gr

    ws, queue = app.workspace, app.queue
    with gr.Row():
        name = gr.Dropdown(label="Subject", elem_id="subject-pick", scale=3)
        with gr.Column(scale=2):
            with gr.Row():
                new_name = gr.Textbox(label="New name", elem_id="new-name", scale=2)
                rename = gr.Button("Rename", elem_id="rename", scale=1)
    with gr.Row():
        with gr.Column(scale=1):
            refs = gr.Gallery(label="Reference pictures", columns=5, height=170, object_fit="contain",
                              elem_id="subject-refs")
            summary = gr.Markdown(elem_id="subject-summary")
        with gr.Column(scale=1):
            loss = gr.LinePlot(None, x="step", y="loss", color="stage", color_map=panels.STAGE_COLORS,
                               title="Training loss", height=240, elem_id="subject-loss")
            vals = gr.Gallery(label="Validation pictures", columns=5, height=150, object_fit="contain",
                              fit_columns=False, elem_id="subject-validation")
    with gr.Row():
        zip_button = gr.Button("Download as zip", elem_id="zip")
        delete = gr.Button("Delete...", variant="stop", elem_id="delete")
    with gr.Row(visible=False) as confirm_row:
        confirm_text = gr.Markdown()
        confirm = gr.Button("Yes, delete it", variant="stop", elem_id="confirm-delete")
        keep = gr.Button("Keep it", elem_id="keep")
    zip_file = gr.File(label="Zip", interactive=False, visible=False, elem_id="zip-file")
    msg = gr.Markdown(elem_id="subjects-message")

    def on_pick(subject_name):
        if not subject_name:
            return [], "No subject yet: train one in Personalize, or point `tokenbooth train --output` at " \
                       f"`{ws.subjects_dir}/NAME`.", panels.loss_table(None), [], gr.Row(visible=False), ""
        subject = ws.subject(subject_name)
        return ([str(p) for p in subject.references()], panels.subject_summary(subject, queue),
                panels.loss_table(subject), panels.validation_items(subject), gr.Row(visible=False), "")

    def idle(subject_name):
        if queue.active(subject_name):
            raise UserError(f"{subject_name} is queued or training; cancel it first")

    def on_rename(subject_name, wanted):
        idle(subject_name)
        renamed = ws.rename(subject_name, wanted)
        names = [x.name for x in ws.subjects()]
        return gr.Dropdown(choices=names, value=renamed), f"Renamed {subject_name} to **{renamed}**."

    def on_delete(subject_name):
        ws.subject(subject_name)
        return gr.Row(visible=True), f"Delete **{subject_name}** and all its files? This cannot be undone.", ""

    def on_confirm(subject_name):
        idle(subject_name)
        ws.delete(subject_name)
        names = [x.name for x in ws.subjects()]
        return (gr.Dropdown(choices=names, value=names[0] if names else None), gr.Row(visible=False),
                f"Deleted {subject_name}.")

    def on_zip(subject_name):
        path = ws.export_zip(subject_name)
        return gr.File(value=str(path), visible=True), f"{path.name}: {path.stat().st_size / 2**20:.1f} MB"

    show = dict(fn=_friendly(on_pick, 6), inputs=name, outputs=[refs, summary, loss, vals, confirm_row, msg],
                show_progress="hidden")
    name.change(**show)
    rename.click(_friendly(on_rename, 2), [name, new_name], [name, msg])
    delete.click(_friendly(on_delete, 3), name, [confirm_row, confirm_text, msg])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)
    confirm.click(_friendly(on_confirm, 3), name, [name, confirm_row, msg])
    zip_button.click(_friendly(on_zip, 2), name, [zip_file, msg])
    return {"name": name, "show": show}


# --- serving -----------------------------------------------------------------------------------------------

def launch(workspace: Path, model: str = "mini", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True):
    """Starts the queue's worker and serves the page; returns (demo, url) when block is False."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless --share
    app = TokenboothApp(Workspace(workspace), default_model=model)
    app.queue.start()
    demo = build(app)
    demo.queue(default_concurrency_limit=1)  # one drawing at a time: the model's weights are shared
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, share=share, css=CSS, show_error=True,
                                allowed_paths=[str(app.workspace.root)], max_file_size=MAX_IMAGE_BYTES,
                                prevent_thread_lock=not block, inbrowser=False, quiet=not block)
    except OSError as e:
        app.queue.stop()
        raise UserError(f"cannot listen on {host}:{port}: {e}") from None
    return demo, url, app
