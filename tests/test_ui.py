"""The web app's parts that need no browser: workspace names and uploads, the job queue, resuming after a
restart, progress, generated PNGs. The real training child is stood in for by a few lines of Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
from PIL import Image

from tokenbooth.errors import UserError
from tokenbooth.personalize import run_folder
from tokenbooth.personalize.recipe import TrainConfig
from tokenbooth.ui import handlers, panels
from tokenbooth.ui import lock as lock_module
from tokenbooth.ui import workspace as wsmod
from tokenbooth.ui.handlers import (AdvancedSettings, TokenboothApp, cancel_choices, cancel_training, check_pictures,
                                    delete_subject, restore_form, start_training, training_status)
from tokenbooth.ui.lock import WorkspaceLock
from tokenbooth.ui.panels import STAGE_COLORS, loss_svg, time_left_words
from tokenbooth.ui.jobs import Job, JobQueue, error_from_log, train_command, train_flags
from tokenbooth.ui.progress import stage_progress
from tokenbooth.ui.workspace import Workspace, check_uploads, sanitize_name


def picture(path, size=(8, 8)):
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


@pytest.fixture
def ws(tmp_path):
    return Workspace(tmp_path / "ws")


def subject_with_job(ws, name, state="queued"):
    subject = ws.create_subject(name, [picture(ws.root / f"{name}.png")])
    Job(name, "mini", ["--class-name", "robot"], state=state).save(ws)
    return subject


# --- names and uploads -------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [("robot", "robot"), ("  my dog!  ", "my-dog"), (".hidden", "hidden"),
                                        ("x" * 100, "x" * 64), ("ロボット", "ロボット"), ("日本 の 犬", "日本-の-犬"),
                                        ("cafe\u0301", "caf\u00e9"), ("Zoë_2", "Zoë_2"), ("console", "console"),
                                        ("com10", "com10"), ("ロ" * 80, "ロ" * 64)])
def test_subject_names_are_one_safe_folder_name_in_any_script(raw, clean):
    assert sanitize_name(raw) == clean  # letters of any script, NFC: the same name is the same folder everywhere
    assert len(sanitize_name(raw).encode()) <= wsmod.MAX_NAME_BYTES


@pytest.mark.parametrize("raw", ["", "...", "/", "../x", "a/b", "a\\b", "../../etc/passwd", "con", "CON", "Nul",
                                 "con.txt", "aux.tar.gz", "COM1", "lpt9.png", "robot.", "robot. ", "!!!"])
def test_separators_trailing_dots_and_windows_device_names_are_refused(raw):
    with pytest.raises(UserError):
        sanitize_name(raw)


def test_no_subject_name_reaches_outside_the_workspace(ws):
    for evil in ("../outside", "..", "/etc", "a/../../b", "con"):
        with pytest.raises(UserError):
            ws.subject_folder(evil)
    subject_with_job(ws, "robot", state="done")
    with pytest.raises(UserError, match="path separator"):
        ws.rename("robot", "../../escaped")
    assert (ws.subjects_dir / "robot").is_dir() and not (ws.root.parent / "escaped").exists()
    assert ws.rename("robot", "ロボット") == "ロボット" and ws.subject("ロボット").folder.parent == ws.subjects_dir


def test_a_taken_name_gets_a_number(ws):
    subject_with_job(ws, "robot")
    assert ws.free_name("robot") == "robot-2"
    with pytest.raises(UserError, match="already exists"):
        ws.create_subject("robot", [])


def test_uploads_over_the_limits_or_unreadable_are_named(tmp_path, monkeypatch):
    good = [picture(tmp_path / f"ok{i}.png") for i in range(3)]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(picture(tmp_path / "full.png", (64, 64)).read_bytes()[:60])
    checked = check_uploads(good + [tmp_path / "notes.txt", tmp_path / "broken.jpg", truncated])
    assert checked.accepted == good and checked.ok
    message = checked.message()
    for name in ("notes.txt", "broken.jpg", "cut.png"):
        assert name in message

    monkeypatch.setattr(wsmod, "MAX_IMAGE_BYTES", 10)
    assert "over the" in check_uploads(good[:1]).message()

    many = [picture(tmp_path / f"m{i}.png") for i in range(wsmod.MAX_IMAGES + 1)]
    checked = check_uploads(many)
    assert not checked.ok and "too many images (11)" in checked.message()


def test_a_subject_folder_appears_whole_with_its_references(ws, tmp_path):
    subject = ws.create_subject("dog", [picture(tmp_path / "a.JPG"), picture(tmp_path / "b.png")])
    assert [p.name for p in subject.references()] == ["ref-00.jpg", "ref-01.png"]
    assert not list(ws.subjects_dir.glob(".*"))  # no temporary folder left behind


def test_the_zip_holds_the_adapter_but_not_the_checkpoints(ws):
    subject = subject_with_job(ws, "robot", state="done")
    (subject.folder / "adapter_config.json").write_text("{}")
    (subject.folder / "checkpoints" / "step-2").mkdir(parents=True)
    (subject.folder / "checkpoints" / "step-2" / "state.pt").write_bytes(b"x")
    names = zipfile.ZipFile(ws.export_zip("robot")).namelist()
    assert "robot/adapter_config.json" in names and "robot/references/ref-00.png" in names
    assert not any("checkpoints" in n for n in names)


def test_delete_removes_the_subject_and_its_files(ws):
    subject_with_job(ws, "robot", state="done")
    ws.delete("robot")
    assert ws.subjects() == [] and not list(ws.subjects_dir.iterdir())


# --- training flags ----------------------------------------------------------------------------------------

def test_train_flags_reproduce_every_setting_through_the_real_parser():
    from tokenbooth.cli import build_parser

    cfg = TrainConfig.for_family("mini", class_name="robot", stage1_steps=7, stage2_lr=1e-3, layers="lora",
                                 prior_preservation=True, validation_prompts=["a [V] robot", "a [V] robot, red"])
    from tokenbooth.commands.train import given_settings

    args = build_parser().parse_args(["train", "--images", "x", "--output", "y", *train_flags(cfg)])
    assert TrainConfig.for_family("mini", **given_settings(args)) == cfg  # what `train` builds from the flags


# --- the queue ---------------------------------------------------------------------------------------------

STAND_IN = r"""
import json, pathlib, sys, time
folder, seconds, outcome = pathlib.Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with open(folder.parent.parent / "order.txt", "a") as f:
    f.write(f"{folder.name} start {time.time()}\n")
time.sleep(seconds)
with open(folder.parent.parent / "order.txt", "a") as f:
    f.write(f"{folder.name} end {time.time()}\n")
if outcome == "fail":
    print("tokenbooth: error: the class name is not a word", file=sys.stderr)
    sys.exit(1)
(folder / "adapter_config.json").write_text("{}")
"""


def stand_in(seconds=0.2, outcomes=None):
    """A training child that takes `seconds`, records when it ran, and succeeds or fails like `train` does."""
    def command(workspace, job):
        outcome = (outcomes or {}).get(job.name, "ok")
        return [sys.executable, "-c", STAND_IN, str(workspace.subject_folder(job.name)), str(seconds), outcome]
    return command


def wait_until(predicate, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def states(ws, names):
    return [Job.load(ws, n).state for n in names]


def test_the_queue_runs_one_training_at_a_time_in_submission_order(ws):
    queue = JobQueue(ws, command=stand_in(0.3))
    names = ["a", "b", "c"]
    for name in names:
        subject_with_job(ws, name)
    places = [queue.submit(Job(n, "mini", [])) for n in names]
    assert places == [0, 1, 2]  # the first runs at once, the others wait with their place
    assert [j.name for j in queue.waiting()] == names
    queue.start()
    wait_until(lambda: states(ws, names) == ["done"] * 3)
    queue.stop()
    events = [line.split() for line in (ws.root / "order.txt").read_text().splitlines()]
    assert [(n, e) for n, e, _ in events] == [("a", "start"), ("a", "end"), ("b", "start"), ("b", "end"),
                                              ("c", "start"), ("c", "end")]


def test_cancel_drops_a_waiting_job_and_stops_the_running_one(ws):
    queue = JobQueue(ws, command=stand_in(30)).start()
    for name in ("long", "next"):
        subject_with_job(ws, name)
        queue.submit(Job(name, "mini", []))
    wait_until(lambda: queue.running() is not None and Job.load(ws, "long").state == "running")
    assert queue.cancel("next") == "waiting"
    assert queue.cancel("long") == "running"
    wait_until(lambda: queue.running() is None)
    queue.stop()
    assert states(ws, ["long", "next"]) == ["cancelled", "cancelled"]
    assert set(queue.unfinished()) == {"long", "next"}


def test_a_failing_job_shows_its_error_and_the_queue_goes_on(ws):
    queue = JobQueue(ws, command=stand_in(0.1, {"bad": "fail"})).start()
    for name in ("bad", "good"):
        subject_with_job(ws, name)
        queue.submit(Job(name, "mini", []))
    wait_until(lambda: states(ws, ["bad", "good"]) == ["failed", "done"])
    queue.stop()
    assert Job.load(ws, "bad").error == "the class name is not a word"


def test_a_restarted_server_offers_to_resume_what_it_left_unfinished(ws):
    subject_with_job(ws, "killed", state="running")
    subject_with_job(ws, "waiting", state="queued")
    finished = subject_with_job(ws, "finished", state="running")  # died after writing its adapter
    (finished.folder / "adapter_config.json").write_text("{}")
    queue = JobQueue(ws)
    assert sorted(queue.recovered) == ["killed", "waiting"]
    assert states(ws, ["killed", "waiting", "finished"]) == ["interrupted", "interrupted", "done"]
    assert sorted(queue.unfinished()) == ["killed", "waiting"]

    job = Job.load(ws, "killed")
    assert "--resume" not in train_command(ws, job) and "--class-name" in train_command(ws, job)
    checkpoint = ws.subject_folder("killed") / "checkpoints" / "step-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text("{}")
    assert train_command(ws, job)[-1] == "--resume"  # from the last complete checkpoint, with its own settings
    assert queue.resume("killed") == 0 and queue.active("killed")
    with pytest.raises(UserError):
        queue.resume("finished")


def test_the_error_line_is_the_commands_own_message_or_the_traceback_end():
    assert error_from_log("loading\ntokenbooth: error: no readable image in x\n", 1) == "no readable image in x"
    assert error_from_log("Traceback...\nRuntimeError: boom\n", 1).endswith("RuntimeError: boom")


# --- progress and generated images ------------------------------------------------------------------------

def test_progress_reports_each_stage_withtime_left_words():
    run = {"stage1_steps": 4, "stage2_steps": 2, "stages": "two-stage"}
    records = [{"step": i + 1, "stage": "embedding", "loss": 1.0, "seconds": 0.5} for i in range(3)]
    first, second = stage_progress(run, records)
    assert (first.stage, first.done, first.total, first.seconds_left) == ("embedding", 3, 4, 0.5)
    assert (second.stage, second.done, second.total, second.seconds_left) == ("layers", 0, 2, 1.0)
    assert [s.seconds_left for s in stage_progress(run, [])] == [None, None]


def test_a_generated_png_carries_its_settings(ws, tiny_model_dir):
    from tokenbooth.ui.models import Models, generate, read_png_settings

    paths, settings = generate(Models(), ws, str(tiny_model_dir), None, "a robot", 2, {"seed": 3, "cfg_scale": 2.0})
    assert len(paths) == 2 and all(p.parent == ws.generations_dir for p in paths)
    saved = read_png_settings(paths[1])
    assert (saved["prompt"], saved["seed"], saved["cfg_scale"], saved["index"]) == ("a robot", 3, 2.0, 1)
    assert json.loads(json.dumps(settings))["sampler"] == "plain"


def test_the_base_side_of_a_comparison_drops_the_placeholder():
    from tokenbooth.personalize.placeholder import remove_placeholder

    assert remove_placeholder("a [V] robot on the beach", "[V]") == "a robot on the beach"


def test_ui_help_documents_every_option_and_listens_locally_by_default():
    from tokenbooth.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["ui"]
    text = sub.format_help()
    for flag in ("--model", "--workspace", "--host", "--port", "--share"):
        assert flag in text
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, "mini")


def test_the_page_shows_a_failed_jobs_error_and_the_waiting_order(ws):
    from tokenbooth.ui import panels

    subject_with_job(ws, "broken", state="failed")
    job = Job.load(ws, "broken")
    job.error, job.finished = "loss became nan at step 3; <try> a lower learning rate", time.time()
    job.save(ws)
    queue = JobQueue(ws)
    for name in ("first", "second"):
        subject_with_job(ws, name)
        queue.submit(Job(name, "mini", []))
    page = panels.job_html(queue, panels.focus_job(queue))
    assert "broken" in page and "failed" in page and "&lt;try&gt; a lower learning rate" in page
    assert page.index("first") < page.index("second")


def test_validation_pictures_are_captioned_with_their_step_and_the_fidelity_the_run_logged(tmp_path):
    from tokenbooth.ui.panels import validation_items

    folder = tmp_path / "robot"
    (folder / "validation").mkdir(parents=True)
    for name in ("step-10.png", "step-2.png", "final.png"):
        Image.new("RGB", (8, 8)).save(folder / "validation" / name)
    (folder / "fidelity.jsonl").write_text(
        json.dumps({"step": 2, "stage": "embedding", "fidelity": 0.61234, "encoder": "toyDINO"}) + "\n"
        + json.dumps({"step": 12, "stage": "final", "fidelity": 0.7, "encoder": "toyDINO"}) + "\n")
    captions = [c for _, c in validation_items(wsmod.Subject("robot", folder))]
    assert captions == ["step 2: fidelity 0.612 (toyDINO)", "step 10", "final: fidelity 0.700 (toyDINO)"]


# --- what the page's clicks do (handlers.py, called without Gradio) ----------------------------------------

def test_the_quick_preset_trains_a_fifth_of_the_familys_steps():
    from tokenbooth.ui.handlers import form_defaults

    family = TrainConfig.for_family("mini")
    full, quick = form_defaults("mini", "family defaults"), form_defaults("mini", "quick")
    assert full == (family.stage1_steps, family.stage1_lr, family.stage2_steps, family.stage2_lr, family.batch_size)
    assert quick == (family.stage1_steps // 5, family.stage1_lr, family.stage2_steps // 5, family.stage2_lr,
                     family.batch_size)


def test_starting_a_training_names_the_subject_after_its_class_word_and_queues_it(ws, tmp_path):
    from tokenbooth.ui.handlers import AdvancedSettings, TokenboothApp, start_training

    app = TokenboothApp(ws)
    advanced = AdvancedSettings(stage1_steps=3, stage1_lr=1e-3, stage2_steps=2, stage2_lr=1e-5, layers="qkv",
                                lora_rank=4, batch_size=2, seed=0, prior_preservation=False, validation_every=0)
    files = [str(picture(tmp_path / "a.png")), str(picture(tmp_path / "b.png"))]
    message = start_training(app, files, " robot ", "", "mini", "family defaults", advanced)
    assert message.startswith("**robot**: started at ") and "(3 + 2 steps on mini)" in message
    assert [p.name for p in ws.subject("robot").references()] == ["ref-00.png", "ref-01.png"]
    assert [j.name for j in app.queue.waiting()] == ["robot"]
    with pytest.raises(UserError, match="class word"):
        start_training(app, files, "  ", "", "mini", "family defaults", advanced)


def test_renaming_a_subject_reports_its_new_folder_name_unless_it_is_training(ws):
    from tokenbooth.ui.handlers import TokenboothApp, rename_subject

    subject_with_job(ws, "robot", state="done")
    app = TokenboothApp(ws)
    assert rename_subject(app, "robot", "my robot!") == (
        ["my-robot"], "my-robot", "Renamed robot to **my-robot** (folder name for 'my robot!').")
    assert rename_subject(app, "my-robot", "ロボット")[2] == "Renamed my-robot to **ロボット**."  # as typed: no note
    app.queue.submit(Job("ロボット", "mini", []))
    with pytest.raises(UserError, match="waiting in the queue; take it out first"):
        rename_subject(app, "ロボット", "other")


def test_a_page_that_polls_again_gets_only_what_changed(ws):
    from tokenbooth.ui.handlers import TokenboothApp, training_status

    app = TokenboothApp(ws)
    seen, changed = training_status(app, {})
    assert set(changed) == {"view", "loss", "validation", "cancel", "resume"}  # a new page draws everything
    assert training_status(app, seen) == (seen, {})  # nothing happened since: nothing is redrawn
    subject_with_job(ws, "robot", state="interrupted")
    _, changed = training_status(app, seen)
    assert changed["resume"][0] == [("robot: interrupted (the server stopped), starts over", "robot")]
    assert "robot" in changed["view"]


# --- issue 26: what a first session in the browser tripped over ---------------------------------------------

def quick_app(ws):
    """An app whose queue is not started: submitted jobs stay waiting, in order."""
    return TokenboothApp(ws, queue=JobQueue(ws, command=stand_in(30)))


def advanced_settings(**changes):
    fields = dict(stage1_steps=3, stage1_lr=1e-3, stage2_steps=2, stage2_lr=1e-5, layers="qkv", lora_rank=4,
                  batch_size=2, seed=0, prior_preservation=False, validation_every=0)
    return AdvancedSettings(**{**fields, **changes})


def test_any_waiting_job_can_be_taken_out_and_cancel_names_the_job(ws):
    app = quick_app(ws)
    for name in ("a", "b", "c", "d"):
        subject_with_job(ws, name)
        app.queue.submit(Job(name, "mini", []))
    assert [v for _, v in cancel_choices(app.queue)] == ["a", "b", "c", "d"]
    assert cancel_choices(app.queue)[1][0] == "b (waiting, number 2 in the queue)"
    message = cancel_training(app, "c")
    assert "**c**" in message and "out of the queue" in message
    assert [j.name for j in app.queue.waiting()] == ["a", "b", "d"] and Job.load(ws, "c").state == "cancelled"
    names, message = delete_subject(app, "d")  # a waiting subject is deleted at once: it leaves the queue first
    assert "d" not in names and "taken out of the queue" in message
    assert [j.name for j in app.queue.waiting()] == ["a", "b"]


def test_the_running_job_is_cancelled_by_name_and_cannot_be_deleted_while_it_runs(ws):
    app = quick_app(ws)
    app.queue.start()
    for name in ("long", "next"):
        subject_with_job(ws, name)
        app.queue.submit(Job(name, "mini", []))
    wait_until(lambda: Job.load(ws, "long").state == "running")
    assert cancel_choices(app.queue)[0] == ("long (training)", "long")
    with pytest.raises(UserError, match="long is training; cancel it first"):
        delete_subject(app, "long")
    assert "Cancelled **long**" in cancel_training(app, "long")
    wait_until(lambda: Job.load(ws, "long").state == "cancelled")
    cancel_training(app, "next")
    app.queue.stop()


def test_a_new_subject_and_a_rename_say_the_folder_name_when_it_is_not_what_was_typed(ws, tmp_path):
    app = quick_app(ws)
    files = [str(picture(tmp_path / "a.png"))]
    assert start_training(app, files, "robot", "my robot!", "mini", "family defaults",
                          advanced_settings()).startswith("**my-robot** (folder name for 'my robot!'): started at")
    assert start_training(app, files, "robot", "ロボット", "mini", "family defaults",
                          advanced_settings()).startswith("**ロボット**: queued at ")  # the name as typed
    with pytest.raises(UserError, match="path separator"):
        start_training(app, files, "robot", "../../evil", "mini", "family defaults", advanced_settings())
    with pytest.raises(UserError, match="reserved"):
        start_training(app, files, "robot", "con", "mini", "family defaults", advanced_settings())
    assert sorted(s.name for s in ws.subjects()) == ["my-robot", "ロボット"]


def test_the_start_message_stays_true_after_the_job_has_moved_on(ws, tmp_path):
    app = quick_app(ws)
    files = [str(picture(tmp_path / "a.png"))]
    start_training(app, files, "robot", "", "mini", "family defaults", advanced_settings())
    second = start_training(app, files, "robot", "robot2", "mini", "family defaults", advanced_settings())
    assert "queued at " in second and "behind 1 training(s)" in second  # a past event, not "waiting, number 1"
    assert "waiting" not in second and "number" not in second


def log_steps(folder, seconds):
    with open(folder / "log.jsonl", "w") as f:
        for i, s in enumerate(seconds):
            f.write(json.dumps({"step": i + 1, "stage": "embedding", "loss": 1.0, "seconds": s}) + "\n")


RUN_WITH_PICTURES = {"stage1_steps": 10, "stage2_steps": 0, "stages": "embedding", "validation_steps": 2,
                     "validation_prompts": ["a [V] robot"]}


def test_time_left_counts_the_validation_pictures_still_to_draw():
    # pictures after steps 2, 4, 6, 8 and final.png; each adds 28 s to the step after it
    seconds = [1, 1, 29, 1, 29, 1]
    records = [{"step": i + 1, "stage": "embedding", "loss": 1.0, "seconds": s} for i, s in enumerate(seconds)]
    (stage,) = stage_progress(RUN_WITH_PICTURES, records)
    assert stage.done == 6 and not stage.at_least
    assert stage.seconds_left == pytest.approx(4 * 1 + 2 * 28)  # steps 7-10, pictures after 8 and final

    # a stage starts its clock afresh: the picture after stage 1's last step (4) is in no step's seconds
    two_stages = {**RUN_WITH_PICTURES, "stages": "two-stage", "stage1_steps": 4, "stage2_steps": 6}
    records = [{"step": i + 1, "stage": "embedding", "loss": 1.0, "seconds": s} for i, s in enumerate([1, 1, 29, 1, 1])]
    first, second = stage_progress(two_stages, records)
    assert first.seconds_left == 0 and second.seconds_left == pytest.approx(5 * 1 + 3 * 28)  # after 6, 8, final


def test_before_a_picture_is_timed_the_time_left_is_a_lower_bound():
    records = [{"step": i + 1, "stage": "embedding", "loss": 1.0, "seconds": 1.0} for i in range(2)]
    (stage,) = stage_progress(RUN_WITH_PICTURES, records, since_last_step=12.0)  # step 2's picture: 12 s so far
    assert stage.at_least and stage.seconds_left == pytest.approx(8 + 12)
    assert time_left_words(stage, True) == ", at least 20s left"
    (stage,) = stage_progress(RUN_WITH_PICTURES, [])
    assert time_left_words(stage, True) == ", starting"  # nothing timed yet: no "estimating... left"


def test_the_page_says_starting_then_drawing_a_picture(ws):
    subject = subject_with_job(ws, "robot", state="running")
    job = Job.load(ws, "robot")
    job.started = time.time() - 5
    job.save(ws)
    cfg = TrainConfig.for_family("mini", class_name="robot", stage1_steps=10, stage2_steps=0, stages="embedding",
                                 validation_steps=2, validation_prompts=["a [V] robot"])
    run_folder.write_run(subject.folder, cfg, None)
    queue = JobQueue(ws)
    queue._running = job  # as the worker holds it while the child trains
    page = panels.job_html(queue, job)
    assert "0/10 steps, starting" in page and "estimating" not in page
    log_steps(subject.folder, [1.0, 1.0])
    page = panels.job_html(queue, job)
    assert "Drawing the validation picture of step 2" in page and "at least" in page


def test_a_resumed_job_shows_the_step_it_went_back_to(ws):
    subject = subject_with_job(ws, "robot", state="running")
    cfg = TrainConfig.for_family("mini", class_name="robot", stage1_steps=10, stage2_steps=0, stages="embedding")
    run_folder.write_run(subject.folder, cfg, None)
    log_steps(subject.folder, [1.0] * 8)  # the stopped run got to step 8; its last checkpoint is step 6
    checkpoint = subject.folder / "checkpoints" / "step-6"
    checkpoint.mkdir(parents=True)
    (checkpoint / "progress.json").write_text("{}")
    job = Job.load(ws, "robot")
    job.started = time.time() + 1  # resumed after the log was last written: the child is still loading
    queue = JobQueue(ws)
    queue._running = job
    page = panels.job_html(queue, job)
    assert "6/10 steps" in page and "go on from its checkpoint at step 6" in page
    job.started = time.time() - 60  # the resumed run has written its log since: it is the truth again
    assert "8/10 steps" in panels.job_html(queue, job)


def test_resume_offers_say_why_a_job_stopped_and_where_it_would_go_on_from(ws):
    subject_with_job(ws, "early", state="cancelled")  # cancelled before its first checkpoint
    killed = subject_with_job(ws, "killed", state="interrupted")
    (killed.folder / "checkpoints" / "step-4").mkdir(parents=True)
    (killed.folder / "checkpoints" / "step-4" / "progress.json").write_text("{}")
    _, changed = training_status(quick_app(ws), {})
    choices, _ = changed["resume"]
    assert choices == [("killed: interrupted (the server stopped), from step 4", "killed"),
                       ("early: cancelled, starts over", "early")]
    assert "starts it over" in changed["view"] or "from its checkpoint" in changed["view"]


def test_generate_reports_the_whole_clicks_time_with_the_base_models_side(ws, monkeypatch):
    finished = subject_with_job(ws, "robot", state="done")
    (finished.folder / "adapter_config.json").write_text(json.dumps({"backbone": "mini", "class_name": "robot"}))

    def slow_generate(models, workspace, model, subject, prompt, n, overrides, quantize="none"):
        time.sleep(0.3)  # the drawing itself reports 0.01 s: loading and saving are the rest
        return [ws.root / f"{prompt}-{i}.png" for i in range(n)], {"seconds": 0.01, "seed": 0, "cfg_scale": 3.0,
                                                                   "image_top_k": 10, "sampler": "plain",
                                                                   "quantize": quantize or "none"}
    monkeypatch.setattr(handlers, "generate", slow_generate)
    drawn = handlers.generate_images(quick_app(ws), "subject:robot", "a [V] robot", 2, 0, None, None, "plain", True)
    seconds = float(drawn.message.split(" in ")[1].split("s")[0])
    assert seconds >= 0.6  # both drawings, not the first one's 0.01 s
    assert "and the base model's 2" in drawn.message and "0.01s for the base model's" in drawn.message
    assert len(drawn.base) == 2


def test_an_unreadable_upload_is_taken_out_of_the_list_and_named(tmp_path):
    good = [str(picture(tmp_path / f"ok{i}.png")) for i in range(2)]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    kept, thumbs, message, memory = check_pictures(good + [str(tmp_path / "broken.jpg")])
    assert kept == good and thumbs == good
    assert "broken.jpg: not a readable image" in message and "Left out of the list: broken.jpg." in message
    again = check_pictures(good, memory)  # the pruned list comes back through the widget's change event
    assert again.kept is None and again.message == message  # the list stays, and so does what named the file
    assert check_pictures(good).kept is None and check_pictures(None).message == ""


def test_the_empty_loss_plot_says_when_it_fills_and_draws_each_stage_in_its_colour():
    assert "appears here with the first training step" in loss_svg([])
    svg = loss_svg([{"step": 1, "stage": "embedding", "loss": 2.0}, {"step": 2, "stage": "embedding", "loss": 1.0},
                    {"step": 3, "stage": "layers", "loss": 0.5}])
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert STAGE_COLORS["embedding"] in svg and STAGE_COLORS["layers"] in svg


def test_a_reloaded_page_gets_back_the_form_of_the_training_it_started(ws, tmp_path):
    app = quick_app(ws)
    assert restore_form(app) is None  # nothing training: the form starts from the defaults
    files = [str(picture(tmp_path / "a.png")), str(picture(tmp_path / "b.png"))]
    start_training(app, files, "robot", "", "mini", "family defaults", advanced_settings(stage1_steps=7))
    restored = restore_form(app)
    assert (restored.class_word, restored.subject_name, restored.model) == ("robot", "robot", "mini")
    assert [p.split("/")[-1] for p in restored.files] == ["ref-00.png", "ref-01.png"]
    assert restored.fields == (7, 1e-3, 2, 1e-5, 2)


def test_a_subject_cancelled_before_its_run_began_still_shows_its_settings(ws):
    flags = train_flags(TrainConfig.for_family("mini", class_name="robot", stage1_steps=7))
    subject = ws.create_subject("robot", [picture(ws.root / "r.png")])
    Job("robot", "mini", flags, state="cancelled").save(ws)
    summary = panels.subject_summary(subject, TokenboothApp(ws).queue)
    assert "cancelled" in summary and "`[V] robot`" in summary and "| stage1_steps | 7 |" in summary
    assert "resuming starts it over" in summary


def test_a_second_server_on_the_same_workspace_refuses_in_one_line(ws):
    first = WorkspaceLock(ws.root).acquire()
    with pytest.raises(UserError) as refused:
        WorkspaceLock(ws.root).acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and str(ws.root) in message and "\n" not in message
    first.release()
    WorkspaceLock(ws.root).acquire().release()  # free again once the first has let go


def test_a_lock_left_by_a_dead_server_is_taken_over(ws, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws.root / lock_module.LOCK_FILE).write_text(f"{dead.pid}\n")
    lock_module.WorkspaceLock(ws.root).acquire().release()
    monkeypatch.setattr(lock_module, "fcntl", None)  # where there is no flock (Windows), the recorded pid decides
    (ws.root / lock_module.LOCK_FILE).write_text(f"{dead.pid}\n")
    lock_module.WorkspaceLock(ws.root).acquire()
    (ws.root / lock_module.LOCK_FILE).write_text(f"{os.getppid()}\n")  # a live process (this test's parent)
    with pytest.raises(UserError, match="already serving"):
        lock_module.WorkspaceLock(ws.root).acquire()


def test_a_second_tokenbooth_ui_process_is_refused(ws):
    held = WorkspaceLock(ws.root).acquire()
    code = ("import sys; from tokenbooth.ui.lock import WorkspaceLock; from tokenbooth.errors import UserError\n"
            f"try: WorkspaceLock({str(ws.root)!r}).acquire()\nexcept UserError as e: print(e); sys.exit(3)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    held.release()
    assert result.returncode == 3 and "already serving" in result.stdout
