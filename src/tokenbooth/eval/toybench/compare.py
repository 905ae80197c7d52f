"""Two toy-bench runs side by side, paired: two models (or two settings) asked the same subjects and prompts.

    python -m tokenbooth.eval.toybench.compare RUN_A RUN_B [--rows two-stage-qkv,base]

Each row both runs have is compared metric by metric as the paired difference A - B over the same subjects and
prompts, with the bootstrap interval of the difference itself (eval/stats.py's resampling of subjects and their
prompts): two rows' overlapping intervals cannot tell a real difference, the paired one can. The runs must have
asked the same thing (split, subjects, seed, references, prompts); that is checked on their per-image scores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ...errors import UserError
from .. import stats

PAIRED_METRICS = ("dino", "clip_i", "clip_t", "identity", "identity_all", "prompt")
NOT_METHODS = frozenset({"references", "oracle"})  # the same pictures in every run


def asked(rows: dict[str, list[dict]]) -> list[str | None]:
    """The prompts a subject's rows were asked, in order (every method row of a run asks the same ones)."""
    method = next((r for r in sorted(rows) if r not in NOT_METHODS), None)
    return [image.get("clip_t_text") for image in rows.get(method, [])]


def per_image_scores(run: Path) -> dict[str, dict[str, list[dict]]]:
    """{subject key: {row: per-image scores}} as a toy-bench run folder keeps them."""
    subjects = run / "subjects"
    if not subjects.is_dir():
        raise UserError(f"{run} is not a toy-bench run folder (no subjects/ in it)")
    return {folder.name: {f.stem: json.loads(f.read_text())["images"] for f in sorted((folder / "scores").glob("*.json"))}
            for folder in sorted(subjects.iterdir()) if (folder / "scores").is_dir()}


def paired(a: dict, b: dict, rows: list[str] | None = None) -> dict:
    """{row: {metric: {"a", "b", "difference": {"mean", "ci"}}}} over the subjects both runs scored."""
    shared = [s for s in a if s in b]
    if not shared:
        raise UserError("the two runs share no subject")
    for s in shared:  # the same question asked of both: the same prompts, in the same order
        if asked(a[s]) != asked(b[s]):
            raise UserError(f"subject {s}: the two runs asked different prompts; they cannot be paired")
    candidates = rows or sorted(({r for s in shared for r in a[s]} & {r for s in shared for r in b[s]}) - NOT_METHODS)
    out = {}
    for row in candidates:
        if not all(row in a[s] and row in b[s] for s in shared):
            continue
        out[row] = {}
        for metric in PAIRED_METRICS:
            pairs = [[(x[metric], y[metric]) for x, y in zip(a[s][row], b[s][row])
                      if x.get(metric) is not None and y.get(metric) is not None] for s in shared]
            if not all(pairs):
                continue
            diffs = [[x - y for x, y in p] for p in pairs]
            out[row][metric] = {"a": stats.bench_mean([[x for x, _ in p] for p in pairs]),
                                "b": stats.bench_mean([[y for _, y in p] for p in pairs]),
                                "difference": {"mean": stats.bench_mean(diffs), "ci": stats.bootstrap_ci(diffs)}}
    return {"subjects": shared, "rows": out}


def table(result: dict, a_name: str, b_name: str) -> str:
    lines = [f"{len(result['subjects'])} subjects; A = {a_name}, B = {b_name}; paired difference A - B [95% interval]",
             "", "| row | metric | A | B | A - B |", "|---|---|---|---|---|"]
    for row, metrics in result["rows"].items():
        for metric, f in metrics.items():
            d = f["difference"]
            lines.append(f"| {row} | {metric} | {f['a']:.3f} | {f['b']:.3f} | "
                         f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--rows", help="comma-separated rows (default: every row both runs have)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        result = paired(per_image_scores(args.run_a), per_image_scores(args.run_b),
                        args.rows.split(",") if args.rows else None)
    except UserError as e:
        sys.exit(f"tokenbooth: error: {e}")
    print(table(result, str(args.run_a), str(args.run_b)))
    if args.json:
        from ...io import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
