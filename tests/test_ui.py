"""The web app's parts that need no browser: workspace names and uploads, the job queue, resuming after a
restart, progress, generated PNGs. The real training child is stood in for by a few lines of Python."""

from __future__ import annotations

import json
import sys
import time
import zipfile

import pytest
from PIL import Image

from tokenbooth.errors import UserError
from tokenbooth.personalize.recipe import TrainConfig
from tokenbooth.ui import workspace as wsmod
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
                                        ("../../etc/passwd", "etcpasswd"), ("a/b\\c", "abc"), ("x" * 100, "x" * 64)])
def test_subject_names_are_sanitised_to_one_safe_folder_name(raw, clean):
    assert sanitize_name(raw) == clean


@pytest.mark.parametrize("raw", ["", "...", "/", "日本"])
def test_a_name_with_nothing_usable_is_refused(raw):
    with pytest.raises(UserError):
        sanitize_name(raw)


def test_no_subject_name_reaches_outside_the_workspace(ws):
    for evil in ("../outside", "..", "/etc", "a/../../b"):
        with pytest.raises(UserError):
            ws.subject_folder(evil)
    subject_with_job(ws, "robot", state="done")
    assert ws.rename("robot", "../../escaped") == "escaped"
    assert (ws.subjects_dir / "escaped").is_dir() and not (ws.root.parent / "escaped").exists()


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
    queue.cancel("next")
    queue.cancel("long")
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

def test_progress_reports_each_stage_with_time_left():
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
    from tokenbooth.ui.models import base_prompt

    assert base_prompt("a [V] robot on the beach", "[V]") == "a robot on the beach"


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
