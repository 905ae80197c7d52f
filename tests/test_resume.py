"""Resume is bitwise wherever a run can stop: inside stage 1, exactly at the end of stage 1, inside stage 2
with LoRA or with prior preservation, and through `tokenbooth train --resume`. Each resumed adapter is
compared tensor by tensor with an uninterrupted run's."""

from __future__ import annotations

import pytest
import torch
from helpers import quick, run_cli, subject_images
from safetensors.torch import load_file

from tokenbooth.backbones import load_backbone
from tokenbooth.personalize import load_reference_images, train


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter (not of its checkpoints), by file and name."""
    files = [p for p in folder.rglob("*.safetensors") if "checkpoints" not in p.relative_to(folder).parts]
    return {f"{p.relative_to(folder)}:{k}": v for p in files for k, v in load_file(str(p)).items()}


def assert_same_adapter(a, b) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta and ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"resumed adapter differs in {different[:3]}"


@pytest.mark.parametrize("stop_after,overrides", [
    pytest.param(2, {}, id="inside-stage-1"),
    pytest.param(3, {}, id="at-the-end-of-stage-1"),
    pytest.param(4, {"layers": "lora", "lora_rank": 2}, id="lora-inside-stage-2"),
    pytest.param(4, {"prior_preservation": True, "num_class_images": 2}, id="prior-preservation-inside-stage-2"),
])
def test_a_run_resumed_where_it_stopped_ends_with_the_uninterrupted_adapter(tiny_model_dir, tmp_path, stop_after,
                                                                           overrides):
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    cfg = quick("bfloat16", **overrides)
    whole = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "whole", progress=False)
    part = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "part", progress=False,
                 stop_after=stop_after)
    assert not (part / "adapter_config.json").exists()
    assert (part / "checkpoints" / f"step-{stop_after}").is_dir()
    train(load_backbone(str(tiny_model_dir)), refs, cfg, part, progress=False, resume=True)
    assert_same_adapter(whole, part)
    log = (part / "log.jsonl").read_text().splitlines()
    assert len(log) == cfg.stage1_steps + cfg.stage2_steps  # each step logged once


def count_batches(monkeypatch, interrupt_at: int | None = None) -> list:
    """Counts the training batches drawn; raises KeyboardInterrupt (Ctrl-C) when drawing batch `interrupt_at`."""
    import tokenbooth.personalize.recipe as recipe

    calls, real = [], recipe.make_batch

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(recipe, "make_batch", counted)
    return calls


def test_train_resume_on_the_command_line_continues_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    refs = subject_images(tmp_path / "refs")

    def args(out):
        return ["train", "--model", tiny_model_dir, "--images", refs, "--class-name", "robot", "--output", out,
                "--stage1-steps", "2", "--stage2-steps", "2", "--batch-size", "2", "--checkpointing-steps", "2"]

    code, _, err = run_cli(capsys, *args(tmp_path / "whole"))
    assert code == 0, err
    count_batches(monkeypatch, interrupt_at=3)  # Ctrl-C in step 3, after the step-2 checkpoint
    code, _, err = run_cli(capsys, *args(tmp_path / "part"))
    assert code == 130 and not (tmp_path / "part" / "adapter_config.json").exists()
    calls = count_batches(monkeypatch)
    code, _, err = run_cli(capsys, *args(tmp_path / "part"), "--resume")
    assert code == 0, err
    assert len(calls) == 2  # steps 3 and 4: steps 1 and 2 came from the checkpoint, not trained again
    assert_same_adapter(tmp_path / "whole", tmp_path / "part")


@pytest.mark.parametrize("layers", ["qkv", "lora"])
def test_a_two_stage_run_started_from_a_saved_stage_1_ends_with_the_uninterrupted_adapter(tiny_model_dir, tmp_path,
                                                                                        layers):
    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    cfg = quick("bfloat16", layers=layers, lora_rank=2)
    whole = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "whole", progress=False)
    stage1 = train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", stages="embedding"), tmp_path / "stage1",
                   progress=False)
    branched = train(load_backbone(str(tiny_model_dir)), refs, cfg, tmp_path / "branched", progress=False,
                     stage1_from=stage1)
    assert_same_adapter(whole, branched)
    log = (branched / "log.jsonl").read_text().splitlines()
    assert log[: cfg.stage1_steps] == (stage1 / "log.jsonl").read_text().splitlines()  # stage 1 is the saved one
    assert len(log) == cfg.stage1_steps + cfg.stage2_steps


def test_a_stage_1_trained_with_other_settings_is_refused(tiny_model_dir, tmp_path):
    from tokenbooth.errors import UserError

    refs = load_reference_images(subject_images(tmp_path / "refs"), 16)
    stage1 = train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", stages="embedding"), tmp_path / "stage1",
                   progress=False)
    with pytest.raises(UserError, match="stage1_lr"):
        train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", stage1_lr=0.5), tmp_path / "b",
              progress=False, stage1_from=stage1)
    with pytest.raises(UserError, match="two-stage"):
        train(load_backbone(str(tiny_model_dir)), refs, quick("bfloat16", stages="joint"), tmp_path / "c",
              progress=False, stage1_from=stage1)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
