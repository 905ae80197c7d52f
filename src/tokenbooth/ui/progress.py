"""How far a training run is, read from its folder alone (train_config.json + log.jsonl): per-stage steps
and time left. Any page, tab or restarted server computes the same answer."""

from __future__ import annotations

from dataclasses import dataclass

from ..personalize.recipe import stage_plan

RECENT = 20  # steps whose mean duration predicts the rest


@dataclass
class StageProgress:
    stage: str
    done: int
    total: int
    seconds_left: float | None  # None: no step timed yet

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def stage_progress(run_config: dict, records: list[dict]) -> list[StageProgress]:
    """One entry per stage of the run's plan, in order. Steps are timed from the latest stage's recent steps
    (stage 2 trains more parameters, so its steps are slower than stage 1's)."""
    if not run_config:
        return []
    plan = stage_plan(run_config["stages"], run_config["stage1_steps"], run_config["stage2_steps"])
    done_total = len(records)
    recent = [r["seconds"] for r in records[-RECENT:] if "seconds" in r]
    per_step = sum(recent) / len(recent) if recent else None
    stages, before = [], 0
    for stage, steps in plan:
        done = min(steps, max(0, done_total - before))
        left = None if per_step is None else (steps - done) * per_step
        stages.append(StageProgress(stage, done, steps, left))
        before += steps
    return stages


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "estimating..."
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"
