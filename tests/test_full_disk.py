"""A run the disk stops: one line naming what could not be written and about how much room the run needs, no
half-made adapter, no half-made checkpoint, and a resume from the last complete checkpoint that ends with the
uninterrupted run's adapter. The full disk is a writer that raises ENOSPC, as the kernel does (no tiny
filesystem needed). Checkpoint files follow the umask like the run's other files."""

from __future__ import annotations

import builtins
import errno
import os

import pytest
from helpers import quick, run_cli, subject_images
from test_resume import assert_same_adapter

from tokenbooth.backbones import load_backbone
from tokenbooth.errors import UserError
from tokenbooth.personalize import load_reference_images, train
from tokenbooth.personalize import adapter as adapter_files
from tokenbooth.personalize import run_folder


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_after(monkeypatch, module, name: str, calls: int) -> list:
    """`module.name` works `calls` times, then the disk is full."""
    real, made = getattr(module, name, None) or getattr(builtins, name), []

    def writer(*args, **kwargs):
        made.append(1)
        if len(made) > calls:
            no_space()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, writer, raising=False)
    return made


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_from_the_last_complete_one(
        tiny_model_dir, tmp_path, monkeypatch):
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    cfg = quick("bfloat16", checkpointing_steps=2)  # checkpoints at steps 2, 3 (end of stage 1), 4 and 5
    whole = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "whole", progress=False)
    part = tmp_path / "part"
    full_after(monkeypatch, run_folder, "save_file", calls=2)  # steps 2 and 3 written, step 4's cannot be
    with pytest.raises(UserError) as stopped:
        train(load_backbone(str(tiny_model_dir)), refs, cfg, part, progress=False)
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("no space left on the device: could not write ")
    assert "trainable.safetensors" in message and "MB free there to finish" in message
    assert "--resume" in message and "checkpoints/step-3" in message
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-2", "step-3"]  # no .step-4.tmp
    assert not (part / adapter_files.CONFIG).exists() and not (part / adapter_files.EMBEDS).exists()
    monkeypatch.undo()  # room again
    train(load_backbone(str(tiny_model_dir)), refs, cfg, part, progress=False, resume=True)
    assert_same_adapter(whole, part)
    assert len((part / run_folder.LOG).read_text().splitlines()) == cfg.stage1_steps + cfg.stage2_steps


@pytest.mark.parametrize("overrides,written", [({}, 1), ({"layers": "lora", "lora_rank": 2}, 1)])
def test_the_adapters_files_appear_together_or_not_at_all(tiny_model_dir, tmp_path, monkeypatch, overrides, written):
    """The disk fills while the adapter is written (its [V] written, its layers not): none of its files is
    left in the run folder, and the resumed run writes them all."""
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    cfg = quick("bfloat16", **overrides)
    out = tmp_path / "run"
    full_after(monkeypatch, adapter_files, "save_file", calls=written)
    with pytest.raises(UserError, match="no space left on the device"):
        train(load_backbone(str(tiny_model_dir)), refs, cfg, out, progress=False)
    names = {p.name for p in out.iterdir()}
    assert not names & {adapter_files.CONFIG, adapter_files.EMBEDS, adapter_files.LAYERS, adapter_files.LORA_DIR}
    assert not any(n.startswith(".adapter") for n in names)
    monkeypatch.undo()
    train(load_backbone(str(tiny_model_dir)), refs, cfg, out, progress=False, resume=True)
    assert (out / adapter_files.CONFIG).is_file() and (out / adapter_files.EMBEDS).is_file()
    assert (out / (adapter_files.LORA_DIR if overrides else adapter_files.LAYERS)).exists()


def test_train_on_a_full_disk_exits_with_one_line_and_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    refs = subject_images(tmp_path / "refs")
    argv = ["train", "--model", tiny_model_dir, "--images", refs, "--class-name", "robot", "--output",
            tmp_path / "run", "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2",
            "--checkpointing-steps", "2"]
    full_after(monkeypatch, run_folder, "open", calls=3)  # log.jsonl: the fourth line finds no room
    code, _, err = run_cli(capsys, *argv)
    lines = [line[line.index("tokenbooth: error:"):] for line in err.splitlines() if "tokenbooth: error:" in line]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on the device: could not write" in lines[0] and "log.jsonl" in lines[0]
    assert "checkpoints/step-2" in lines[0]
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert (tmp_path / "run" / adapter_files.CONFIG).is_file()


def test_a_log_line_cut_short_by_a_full_disk_is_dropped_on_resume(tmp_path):
    log = tmp_path / run_folder.LOG
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    run_folder.truncate_log(log, 2)
    assert log.read_text().splitlines() == ['{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.9}']


def test_checkpoint_files_follow_the_umask(tiny_model_dir, tmp_path):
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    previous = os.umask(0o027)
    try:
        out = train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", stages="embedding"),
                    tmp_path / "run", progress=False)
    finally:
        os.umask(previous)
    checkpoint = run_folder.latest_checkpoint(out)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*checkpoint.iterdir(), out / adapter_files.EMBEDS]}
    assert modes and set(modes.values()) == {0o640}, modes
