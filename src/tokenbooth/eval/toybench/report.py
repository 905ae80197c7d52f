"""toy-bench's report: report.md from results.json's content (its tables through eval/tables.py) and
report.png, a bar plot of every row's figures."""

from __future__ import annotations

from PIL import Image, ImageDraw

from ..reader import IDENTITY
from ..tables import markdown_table
from .summary import COMPARED
from .tasks import EXTRAS, HEADINGS, LABELS, METRICS, ORACLE, STAGE1_ROW, VALIDATION_PROMPTS


def cell(figure: dict) -> str:
    if figure["mean"] is None:
        return "-"
    lo, hi = figure["ci"]
    return f"{figure['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines, each cell already written as it should read."""
    return markdown_table([dict(zip(columns, row)) for row in rows], columns).splitlines()


def training_note(train: dict) -> str:
    """The report's words for the training settings: the family's, and any a tuning run changed."""
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(train.items()))
    return "its family's training defaults" + (f" except {changed}" if changed else "")


def markdown(results: dict, bench) -> str:
    """report.md. bench: the run's `Bench` (its sampling config, the training settings a tuning run changed,
    --validation-steps and the stage 1 length)."""
    lines = headline(results, bench)
    lines += table(["row", *(HEADINGS[m] for m in METRICS)],
                   [[LABELS[row], *(cell(figures[m]) for m in METRICS)] for row, figures in results["rows"].items()])
    if results["differences"]:
        lines += ["", "Paired differences (the same subjects and prompts in both rows; 95% bootstrap interval of the "
                  "difference):", ""]
        lines += table(["comparison", *(HEADINGS[m] for m in COMPARED)],
                       [[pair, *(cell(figures[m]) for m in COMPARED)]
                        for pair, figures in results["differences"].items()])
    lines += extra_lines(results)
    lines += identity_by_attribute(results["identity_by_attribute"])
    if results.get("fidelity_along_the_run"):
        lines += fidelity_along_the_run(results["fidelity_along_the_run"], bench)
    if results["goals"]:
        lines += ["", "Goals (issue #10) for two-stage Q/K/V:", ""]
        lines += table(["goal", "value", "target", "met"],
                       [[name, f"{g['value']:.3f}", g["target"], "yes" if g["met"] else "no"]
                        for name, g in results["goals"].items()])
    lines += ["", FOOTNOTE, ""]
    return "\n".join(lines)


def headline(results: dict, bench) -> list[str]:
    s = bench.sampling
    return [
        "# toy-bench v2: the paper's Table 1 on mini", "",
        f"{len(results['subjects'])} subjects of the {results['split']} split (reserved toyworld instances, never in "
        f"pretraining), 4 references and 12 prompts each, one image per prompt; {results['settings']['model']} "
        f"with {training_note(bench.cfg.train)}; sampling: CFG {s.cfg_scale}, image top-k {s.image_top_k}, seed "
        f"{s.seed}, {s.sampler} sampler. {results['minutes']:.1f} min of work in all, on this machine.", "",
    ]


def extra_lines(results: dict) -> list[str]:
    """The words and oracle lines' table, and two-stage Q/K/V's toyDINO as a share of the oracle's."""
    lines = ["", "Two lines that are not methods, scored the same way: **words**, the base model told every "
             "attribute a caption can name ([V] spelled out as body color, pattern and accent color: what text "
             "alone carries; proportions and parts have no word), and the **oracle**, toyworld's own render of "
             "what each prompt asks, the subject exactly: what a perfect model would score against these "
             "references, the prompts' new backgrounds and colors included.", ""]
    lines += table(["line", *(HEADINGS[m] for m in METRICS)],
                   [[LABELS[line], *(cell(results[line][m]) for m in METRICS)] for line in EXTRAS if line in results])
    if "two-stage-qkv" in results["rows"]:
        share = results["rows"]["two-stage-qkv"]["dino"]["mean"] / results[ORACLE]["dino"]["mean"]
        lines += ["", f"Two-stage Q/K/V's toyDINO is {share:.0%} of the oracle's."]
    return lines


def identity_by_attribute(shares: dict) -> list[str]:
    lines = ["", "Identity, attribute by attribute (share of images the reader reads right; the body color "
             "left out where the prompt asks for another):", ""]
    return lines + table(["row", *IDENTITY], [[LABELS[row], *("-" if v is None else f"{v:.2f}" for v in by.values())]
                                              for row, by in shares.items()])


def fidelity_along_the_run(along: dict, bench) -> list[str]:
    steps = sorted({step for points in along.values() for step in points})
    lines = ["", f"Fidelity along the run: toyDINO of {VALIDATION_PROMPTS} validation pictures (new backgrounds) "
             f"to the references, every {bench.cfg.validation_steps} steps, mean over subjects (stage 1 ends at "
             f"step {bench.train_config(STAGE1_ROW, None).stage1_steps}):", ""]
    return lines + table(["row", *(f"step {s}" for s in steps)],
                         [[LABELS[row], *(f"{points[s]:.3f}" if s in points else "-" for s in steps)]
                          for row, points in along.items()])


FOOTNOTE = (
    "Each cell: the mean over subjects of the mean over the subject's images, and its 95% interval "
    "from a bootstrap over subjects and their prompts (1000 resamples). toyDINO and toyCLIP-I: cosine "
    "similarity of an image to the subject's references, averaged over them (references: each against "
    "the others). toyCLIP-T: image against its prompt with [V] removed. identity: share of the subject's "
    "identity attributes (class, body and accent color, pattern, proportion, parts) the attribute "
    "reader reads right, the body color left out where the prompt asks for another; identity, all: "
    "share of images with every one right. prompt: share of what the prompt asked for (background, new "
    "body color, accessory) that the reader reads back. Stage 1 is trained once per subject and shared "
    "by the embedding row and every two-stage row. Grids: `grids/`; bar plot: `report.png`.")


ROW_COLORS = [(120, 120, 120), (200, 200, 200), (70, 160, 80), (200, 70, 70), (60, 110, 200), (140, 90, 200),
              (230, 140, 40)]


def bar_plot(rows: dict):
    """One group of bars per metric, one bar per row, its 95% interval as a whisker (Pillow only)."""
    w, h, left, bottom, top = 1000, 420, 50, 40, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    y = lambda v: h - bottom - max(0.0, min(1.0, v)) * (h - bottom - top)  # noqa: E731
    group = (w - left - 20) / len(METRICS)
    bar = (group - 20) / len(rows)
    for g, metric in enumerate(METRICS):
        for r, (row, figures) in enumerate(rows.items()):
            figure = figures[metric]
            if figure["mean"] is None:
                continue
            x0 = left + g * group + 10 + r * bar
            d.rectangle([x0, y(figure["mean"]), x0 + bar - 2, h - bottom], fill=ROW_COLORS[r])
            xm = x0 + bar / 2 - 1
            d.line([xm, y(figure["ci"][0]), xm, y(figure["ci"][1])], fill="black", width=1)
            for v in figure["ci"]:
                d.line([xm - 3, y(v), xm + 3, y(v)], fill="black")
        d.text((left + g * group + 10, h - bottom + 10), HEADINGS[metric], fill="black")
    for frac in (0.0, 0.5, 1.0):
        d.text((8, y(frac) - 6), f"{frac:.1f}", fill="black")
    d.line([left, h - bottom, w - 10, h - bottom], fill="black")
    for r, row in enumerate(rows):
        x = left + (r % 4) * 230
        d.rectangle([x, 8 + (r // 4) * 20, x + 12, 20 + (r // 4) * 20], fill=ROW_COLORS[r])
        d.text((x + 16, 8 + (r // 4) * 20), LABELS[row], fill="black")
    return img
