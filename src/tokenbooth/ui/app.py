"""The page: three tabs (Personalize, Generate, Subjects) wired to what each click does (handlers.py).

Every number the forms start from comes from the family tables (`TrainConfig.for_family`,
`SamplingConfig.for_family`) and the training presets (personalize/presets.py); training is `tokenbooth train`
in a child process (jobs.py); drawing is `sampling.draw` (models.py). This file only lays out components,
wires events to handlers and turns their plain results into Gradio updates.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path
from types import SimpleNamespace

# Gradio is an optional extra (tokenbooth[ui]): only `tokenbooth ui` imports this module, after checking that
# Gradio is installed; the rest of tokenbooth.ui imports without it.
import gradio as gr

from ..backbones.families import DEFAULT_MODEL
from ..errors import UserError
from ..personalize.placeholder import PLACEHOLDER
from ..personalize.presets import PRESETS, QUICK_FRACTION
from . import handlers, panels
from .handlers import AdvancedSettings, TokenboothApp
from .lock import WorkspaceLock
from .workspace import MAX_IMAGE_BYTES, MAX_IMAGES, Workspace

log = logging.getLogger("tokenbooth.ui")

POLL_SECONDS = 1.0  # how often a page asks for the job's state
PRESET_NAMES = list(PRESETS)  # the first is the default

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
/* validation captions ("step 4: fidelity 0.612 (toyDINO)") wrap instead of ending in "..." */
#validation .caption-label, #subject-validation .caption-label
  {white-space: normal; overflow: visible; text-overflow: clip; max-width: 100%; left: 0; right: 0;}
.tb-loss {max-height: 260px;} .tb-loss-empty {padding: 40px 10px; text-align: center;}
"""


def _event(handler, *bound, outputs: int = 1, show=None, report_errors: bool = True):
    """A Gradio event function: `handler(*bound, *widget values)`, its plain result turned into component
    updates by `show` (a tuple result is spread over its arguments).

    With report_errors, a UserError (or any bug) becomes a message in the event's last output, the others stay
    as they are, and the server keeps serving; without, Gradio shows the error itself (for events whose last
    output is not a message line)."""
    def event(*values):
        try:
            result = handler(*bound, *values)
            if show is None:
                return result
            return show(*result) if isinstance(result, tuple) else show(result)
        except Exception as e:  # noqa: BLE001 - the page must say what broke, whatever it is
            if not report_errors:
                raise
            if not isinstance(e, UserError):
                log.error("handler %s failed:\n%s", handler.__name__, traceback.format_exc())
            text = f"**Error:** {e}" if isinstance(e, UserError) else f"**Error:** {e.__class__.__name__}: {e}"
            return text if outputs == 1 else (*[gr.skip()] * (outputs - 1), text)
    event.__name__ = handler.__name__
    return event


def _show_lists(choices, choice, subjects, subject, known):
    return gr.Dropdown(choices=choices, value=choice), gr.Dropdown(choices=subjects, value=subject), known


def build(app: TokenboothApp):
    with gr.Blocks(title="tokenbooth", analytics_enabled=False) as demo:
        gr.Markdown("## tokenbooth\nTeach an auto-regressive text-to-image model a new subject from a few "
                    f"pictures, then draw it anywhere: *a {PLACEHOLDER} robot on the beach*.")
        with gr.Tabs():
            with gr.Tab("Personalize", id="personalize", elem_id="tab-personalize"):
                p = _personalize_tab(app)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as gen_tab:
                g = _generate_tab(app)
            with gr.Tab("Subjects", id="subjects", elem_id="tab-subjects") as subj_tab:
                s = _subjects_tab(app)

        known = gr.State(None)  # the Generate choices this page has seen (None: not loaded yet)
        lists = dict(fn=_event(handlers.page_lists, app, show=_show_lists, report_errors=False),
                     inputs=[g.choice, s.name, known], outputs=[g.choice, s.name, known], show_progress="hidden")
        demo.load(**lists)
        gen_tab.select(**lists)
        subj_tab.select(**lists).then(**s.show)  # the same name may have changed since: training ended
        demo.load(_event(load_form, app, report_errors=False), inputs=[p.model, p.preset], outputs=p.restored,
                  show_progress="hidden")
    return demo


# --- Personalize -------------------------------------------------------------------------------------------

def _personalize_form(app: TokenboothApp) -> SimpleNamespace:
    """The upload column and the settings column, down to the Start button."""
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
                                        info=f"what the subject is: prompts say \"{PLACEHOLDER} robot\"",
                                        elem_id="class-word")
                name = gr.Textbox(label="Subject name", placeholder="the class word", elem_id="subject-name",
                                  info="its folder in the workspace")
            with gr.Row():
                model = gr.Dropdown(app.model_names(), value=app.default_model, label="Backbone", elem_id="backbone",
                                    info="mini always; real ones when their files are on disk")
                preset = gr.Radio(PRESET_NAMES, value=PRESET_NAMES[0], label="Recipe", elem_id="preset",
                                  info=f"quick: 1/{QUICK_FRACTION} of the steps, for trying")
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                with gr.Row():
                    s1 = gr.Number(label=f"Stage 1 steps ({PLACEHOLDER} only)", precision=0, minimum=1,
                                   elem_id="stage1-steps")
                    lr1 = gr.Number(label="Stage 1 learning rate", elem_id="stage1-lr")
                with gr.Row():
                    s2 = gr.Number(label=f"Stage 2 steps ({PLACEHOLDER} + layers)", precision=0, minimum=1,
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
    return SimpleNamespace(uploads=uploads, thumbs=thumbs, upload_msg=upload_msg, class_word=class_word, name=name,
                           model=model, preset=preset, start=start, start_msg=start_msg,
                           restored=[uploads, class_word, name, model, s1, lr1, s2, lr2, batch],  # load_form's
                           fields=[s1, lr1, s2, lr2, batch],  # what form_defaults fills, in its order
                           advanced=[s1, lr1, s2, lr2, layers, rank, batch, seed, prior, val_every])  # AdvancedSettings


def load_form(app: TokenboothApp, model, preset):
    """A page's first form: the queued or running training's, when there is one (a reload keeps what was
    started), else the chosen backbone and preset's defaults."""
    restored = handlers.restore_form(app)
    if restored is None:
        return (gr.skip(),) * 4 + handlers.form_defaults(model, preset)
    return (restored.files, restored.class_word, restored.subject_name, restored.model, *restored.fields)


def start_from_form(app: TokenboothApp, files, class_word, subject_name, model, preset, *advanced) -> str:
    """Start's click: the Advanced fields arrive one by one, in AdvancedSettings' order."""
    return handlers.start_training(app, files, class_word, subject_name, model, preset, AdvancedSettings(*advanced))


def _choose_from(choices):
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)


def _show_status(now, changed):
    """The training panel's updates: only what changed since the page's last poll, the rest skipped."""
    if "resume" in changed:
        unfinished, offer = changed["resume"]
        resume_parts = (gr.Group(visible=bool(unfinished)), _choose_from(unfinished), offer)
    else:
        resume_parts = (gr.skip(), gr.skip(), gr.skip())
    if "cancel" in changed:
        cancel_parts = (gr.Row(visible=bool(changed["cancel"])), _choose_from(changed["cancel"]))
    else:
        cancel_parts = (gr.skip(), gr.skip())
    return (now, changed.get("view", gr.skip()), changed.get("loss", gr.skip()),
            changed.get("validation", gr.skip()), *cancel_parts, *resume_parts)


def _show_checked(kept, thumbnails, message, memory):
    return (gr.skip() if kept is None else kept), thumbnails, message, memory


def _personalize_tab(app: TokenboothApp) -> SimpleNamespace:
    f = _personalize_form(app)
    gr.Markdown("### Training")
    with gr.Group(visible=False, elem_id="resume-offer") as resume_group:
        resume_note = gr.Markdown()
        with gr.Row():
            resume_name = gr.Dropdown(label="Unfinished training", elem_id="resume-name", scale=3)
            resume = gr.Button("Resume", elem_id="resume", scale=1)
    job_view = gr.HTML(elem_id="job-status")
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("**Training loss**")
            loss_plot = gr.HTML(panels.loss_svg([]), elem_id="loss-plot")
        validation = gr.Gallery(label=f"Validation pictures ({PLACEHOLDER} as it learns)", columns=5, height=260,
                                fit_columns=False, object_fit="contain", elem_id="validation", scale=1)
    with gr.Row(visible=False, elem_id="cancel-row") as cancel_row:
        cancel_pick = gr.Dropdown(label="Training to cancel (running or waiting)", elem_id="cancel-pick", scale=3)
        cancel = gr.Button("Cancel it", variant="stop", elem_id="cancel", scale=1)
    job_msg = gr.Markdown(elem_id="job-message")

    seen = gr.State({})
    gr.Timer(POLL_SECONDS).tick(
        _event(handlers.training_status, app, show=_show_status, report_errors=False), inputs=seen,
        outputs=[seen, job_view, loss_plot, validation, cancel_row, cancel_pick, resume_group, resume_name,
                 resume_note],
        show_progress="hidden", concurrency_limit=None, queue=False)
    checked = gr.State({})  # check_pictures' memory: the list it pruned and the message naming what it left out
    f.uploads.change(_event(handlers.check_pictures, outputs=4, show=_show_checked), [f.uploads, checked],
                     [f.uploads, f.thumbs, f.upload_msg, checked], show_progress="hidden")
    fill = _event(handlers.form_defaults, report_errors=False)
    for control in (f.model, f.preset):
        control.change(fill, [f.model, f.preset], f.fields, show_progress="hidden")
    f.start.click(_event(start_from_form, app), [f.uploads, f.class_word, f.name, f.model, f.preset, *f.advanced],
                  f.start_msg)
    cancel.click(_event(handlers.cancel_training, app), cancel_pick, job_msg)
    resume.click(_event(handlers.resume_training, app), resume_name, job_msg)
    return SimpleNamespace(model=f.model, preset=f.preset, restored=f.restored)


# --- Generate ----------------------------------------------------------------------------------------------

def _show_choice(words, cfg_scale, top_k):
    insert = gr.Button(f"Insert {words}", visible=True) if words else gr.Button(visible=False)
    return insert, cfg_scale, top_k, ""


def _show_drawn(captioned, base, downloads, message):
    return captioned, gr.Gallery(value=base, visible=bool(base)), downloads, message


def _generate_tab(app: TokenboothApp) -> SimpleNamespace:
    with gr.Row():
        with gr.Column(scale=1):
            choice = gr.Dropdown(label="Subject (or the base model)", elem_id="gen-subject")
            prompt = gr.Textbox(label="Prompt", placeholder=f"a {PLACEHOLDER} robot on the beach", lines=2,
                                elem_id="prompt")
            insert = gr.Button(f"Insert {PLACEHOLDER}", size="sm", elem_id="insert-v")
            with gr.Row():
                n = gr.Slider(1, 8, value=4, step=1, label="Images", elem_id="num-images")
                seed = gr.Number(value=0, label="Seed", precision=0, elem_id="gen-seed")
            with gr.Row():
                cfg = gr.Number(label="CFG scale", info="classifier-free guidance", elem_id="cfg")
                top_k = gr.Number(label="Top-k", precision=0, minimum=1, elem_id="top-k")
            sampler = gr.Radio(["plain", "sjd"], value="plain", label="Sampler",
                               info="sjd: speculative Jacobi decoding, the same distribution in fewer passes")
            precision = gr.Radio(list(handlers.PRECISIONS), value="as trained", label="Base precision",
                                 info="nf4/int8: the frozen base in 4 or 8 bits, less GPU memory (needs torchao); "
                                      "as trained: the subject's training base", elem_id="precision")
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

    choice.change(_event(handlers.choice_defaults, app, outputs=4, show=_show_choice), choice,
                  [insert, cfg, top_k, msg], show_progress="hidden")
    insert.click(_event(handlers.insert_placeholder, app, report_errors=False), [choice, prompt], prompt,
                 show_progress="hidden")
    go.click(_event(handlers.generate_images, app, outputs=4, show=_show_drawn),
             [choice, prompt, n, seed, cfg, top_k, sampler, compare, precision], [gallery, base_gallery, files, msg])
    return SimpleNamespace(choice=choice)


# --- Subjects ----------------------------------------------------------------------------------------------

def _show_details(references, summary, loss, validation):
    return references, summary, loss, validation, gr.skip()  # the message line: only for an error


def _show_renamed(names, renamed, message):
    return gr.Dropdown(choices=names, value=renamed), message


def _show_question(question):
    return gr.Row(visible=True), question, ""


def _show_deleted(names, message):
    return gr.Dropdown(choices=names, value=names[0] if names else None), gr.Row(visible=False), message


def _show_zip(path, message):
    return gr.File(value=str(path), visible=True), message


def _subjects_tab(app: TokenboothApp) -> SimpleNamespace:
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
            gr.Markdown("**Training loss**")
            loss = gr.HTML(panels.loss_svg([]), elem_id="subject-loss")
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

    show = dict(fn=_event(handlers.subject_details, app, outputs=5, show=_show_details), inputs=name,
                outputs=[refs, summary, loss, vals, msg], show_progress="hidden")
    name.change(**show)
    # only a pick by hand closes the question and clears the message: a rename or delete also changes the
    # pick, and its message must stay
    name.input(lambda: (gr.Row(visible=False), ""), None, [confirm_row, msg], show_progress="hidden")
    rename.click(_event(handlers.rename_subject, app, outputs=2, show=_show_renamed), [name, new_name], [name, msg])
    delete.click(_event(handlers.ask_to_delete, app, outputs=3, show=_show_question), name,
                 [confirm_row, confirm_text, msg])
    keep.click(lambda: gr.Row(visible=False), None, confirm_row)
    confirm.click(_event(handlers.delete_subject, app, outputs=3, show=_show_deleted), name,
                  [name, confirm_row, msg])
    zip_button.click(_event(handlers.zip_subject, app, outputs=2, show=_show_zip), name, [zip_file, msg])
    return SimpleNamespace(name=name, show=show)


# --- serving -----------------------------------------------------------------------------------------------

def launch(workspace: Path, model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, block: bool = True):
    """Starts the queue's worker and serves the page; returns (demo, url, app) when block is False."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unless --share
    space = Workspace(workspace)
    lock = WorkspaceLock(space.root).acquire()  # before the queue reads the jobs: a second server refuses here
    app = TokenboothApp(space, default_model=model, lock=lock)
    app.queue.start()
    demo = build(app)
    demo.queue(default_concurrency_limit=1)  # one drawing at a time: the model's weights are shared
    try:
        _, url, _ = demo.launch(server_name=host, server_port=port, share=share, css=CSS, show_error=True,
                                allowed_paths=[str(app.workspace.root)], max_file_size=MAX_IMAGE_BYTES,
                                prevent_thread_lock=not block, inbrowser=False, quiet=not block)
    except OSError as e:
        app.queue.stop()
        lock.release()
        raise UserError(f"cannot listen on {host}:{port}: {e}") from None
    return demo, url, app
