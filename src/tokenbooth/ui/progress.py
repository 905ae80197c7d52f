"""How far a training run is, read from its folder alone (train_config.json + log.jsonl): per-stage steps
and time left. Any page, tab or restarted server computes the same answer.

Time left is measured, not guessed: a step's "seconds" in log.jsonl run from the end of the step before, so
the step after a validation picture carries that picture's drawing time (on mini, far more than a training
step). Plain steps give the time per step, the steps after a validation give the time per picture, and the
pictures still to come (every validation_steps, and final.png) are counted in. Before a picture has been
timed, the time left is a lower bound and says so ("at least")."""

from __future__ import annotations

from dataclasses import dataclass

from ..personalize.config import stage_plan

RECENT = 20  # plain steps whose mean duration predicts the rest


@dataclass
class StageProgress:
    stage: str
    done: int
    total: int
    seconds_left: float | None  # None: no step timed yet
    at_least: bool = False  # a validation picture is still to be timed: seconds_left is a lower bound

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def validation_steps(run_config: dict, total: int) -> list[int]:
    """The global steps after which the run draws a validation picture (the last step draws final.png)."""
    every = run_config.get("validation_steps") or 0
    if not run_config.get("validation_prompts") or every <= 0:
        return []
    return list(range(every, total, every))


def stage_progress(run_config: dict, records: list[dict], since_last_step: float | None = None) -> list[StageProgress]:
    """One entry per stage of the run's plan, in order. `since_last_step`: seconds since log.jsonl was last
    written, while the run is alive (a validation picture being drawn right now has taken at least that).
    Steps are timed from the latest plain steps (stage 2 trains more parameters: slower than stage 1's)."""
    if not run_config:
        return []
    plan = stage_plan(run_config["stages"], run_config["stage1_steps"], run_config["stage2_steps"])
    total = sum(steps for _, steps in plan)
    drawn_after = set(validation_steps(run_config, total))
    final_picture = bool(run_config.get("validation_prompts"))
    done_total = len(records)
    # a stage starts its clock afresh: a picture drawn after a stage's last step is in no step's seconds
    stage_ends = {sum(steps for _, steps in plan[:i + 1]) for i in range(len(plan))}
    carried = drawn_after - stage_ends

    timed = [r for r in records if "seconds" in r]
    plain = [r["seconds"] for r in timed if r["step"] - 1 not in drawn_after][-RECENT:]
    per_step = sum(plain) / len(plain) if plain else None
    extra = [r["seconds"] - per_step for r in timed if r["step"] - 1 in carried] if per_step is not None else []
    per_picture = max(0.0, sum(extra) / len(extra)) if extra else None
    # a picture after the last logged step is being drawn now (the next step's record would carry it)
    drawing_now = done_total in drawn_after
    now_left = 0.0
    if drawing_now and since_last_step is not None:
        now_left = since_last_step if per_picture is None else max(0.0, per_picture - since_last_step)

    stages, before = [], 0
    for index, (stage, steps) in enumerate(plan):
        done = min(steps, max(0, done_total - before))
        end = before + steps
        pictures = sum(1 for s in drawn_after if max(before, done_total) < s <= end)
        pictures += final_picture and index == len(plan) - 1
        current = drawing_now and before < done_total <= end
        if per_step is None:
            left, at_least = None, False
        else:
            at_least = per_picture is None and (pictures > 0 or current)
            left = (steps - done) * per_step + pictures * (per_picture or 0.0) + (now_left if current else 0.0)
        stages.append(StageProgress(stage, done, steps, left, at_least))
        before = end
    return stages


def drawing_picture(run_config: dict, records: list[dict]) -> int | None:
    """The step whose validation picture the run is drawing, when its last logged step is one that draws."""
    if not run_config or not records:
        return None
    total = run_config["stage1_steps"] + run_config["stage2_steps"]
    return len(records) if len(records) in validation_steps(run_config, total) else None


def records_of_this_run(records: list[dict], log_written: float | None, started: float | None,
                        checkpoint_step: int | None) -> list[dict]:
    """The steps a run that (re)started at `started` stands on. A resumed run goes back to its last checkpoint
    and drops the log past it, but only once its model is loaded; until it writes the log, the records past
    the checkpoint belong to the run that was stopped."""
    if started is None or log_written is None or log_written >= started:
        return records
    return [r for r in records if r["step"] <= (checkpoint_step or 0)]


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "starting"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"
