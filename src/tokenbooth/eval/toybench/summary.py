"""toy-bench's figures from its per-image scores: each row's means with their bootstrap intervals (DreamBench's
aggregation, eval/stats.py), the paper's comparisons as paired differences, the goals of issue #10, identity
attribute by attribute, and each subject's means."""

from __future__ import annotations

import numpy as np

from .. import stats
from ..reader import IDENTITY
from .tasks import HEADINGS, METRICS

# The paper's comparisons as paired differences (the same subjects and prompts in both rows): the interval is
# that of the difference itself, which two rows' overlapping intervals cannot tell.
COMPARISONS = (("two-stage-qkv", "embedding"), ("two-stage-qkv", "joint"), ("two-stage-lora", "embedding"))
COMPARED = ("dino", "clip_i")


def summarize(scores: dict[str, list[list[dict]]]) -> dict:
    """scores[row][subject] = that subject's per-image scores -> {row: {metric: {"mean", "ci"}}} (None for a
    metric the row does not have)."""
    rows = {}
    for row, per_subject in scores.items():
        rows[row] = {}
        for metric in METRICS:
            values = [v for v in (stats.measured(images, metric) for images in per_subject) if v]
            rows[row][metric] = stats.figure(values)
    return rows


def paired_differences(scores: dict[str, list[list[dict]]]) -> dict:
    """{"A - B": {metric: {"mean", "ci"}}} for each comparison whose two rows were run."""
    out = {}
    for a, b in [(a, b) for a, b in COMPARISONS if a in scores and b in scores]:
        out[f"{a} - {b}"] = {}
        for metric in COMPARED:
            diffs = [[x[metric] - y[metric] for x, y in zip(mine, theirs)]
                     for mine, theirs in zip(scores[a], scores[b])]
            out[f"{a} - {b}"][metric] = {"mean": stats.bench_mean(diffs), "ci": stats.bootstrap_ci(diffs)}
    return out


def goals(rows: dict, differences: dict) -> dict:
    """Issue #10's goals for the paper's row, each {"value", "target", "met"}; a goal whose rows were not run
    is left out. Fidelity is toyDINO (DINO's role)."""
    out = {}
    qkv, refs, base = rows.get("two-stage-qkv"), rows["references"], rows.get("base")
    if qkv is None:
        return out
    share = qkv["dino"]["mean"] / refs["dino"]["mean"]
    out["fidelity, share of the references' ceiling"] = {"value": share, "target": ">= 0.90", "met": share >= 0.9}
    gap = differences.get("two-stage-qkv - embedding")
    if gap:
        out["fidelity above embedding only (paired interval's low end)"] = {
            "value": gap["dino"]["ci"][0], "target": "> 0", "met": gap["dino"]["ci"][0] > 0}
    if "joint" in rows:
        margin = qkv["dino"]["mean"] - rows["joint"]["dino"]["mean"]
        out["joint below two-stage (toyDINO margin)"] = {"value": margin, "target": "> 0", "met": margin > 0}
    for metric in ("clip_t", "prompt") if base else ():
        kept = qkv[metric]["mean"] / base[metric]["mean"]
        out[f"{HEADINGS[metric]} kept, share of base"] = {"value": kept, "target": ">= 0.95", "met": kept >= 0.95}
    return out


def attribute_shares(scores: dict[str, list[list[dict]]]) -> dict:
    """{row: {identity attribute: share of images read right}}, over every subject's images: which parts of
    the identity a row carries (the reader's identity figure averages them)."""
    out = {}
    for row, per_subject in scores.items():
        right = {a: [] for a in IDENTITY}
        for image in (image for images in per_subject for image in images):
            for a, ok in image["attributes"].items():
                right[a].append(ok)
        out[row] = {a: float(np.mean(v)) if v else None for a, v in right.items()}
    return out


def subject_means(scores: dict[str, list[list[dict]]], keys: list[str]) -> dict:
    """{row: {subject: {metric: mean over its images}}}."""
    return {row: {key: stats.subject_means(images, METRICS) for key, images in zip(keys, per_subject)}
            for row, per_subject in scores.items()}
