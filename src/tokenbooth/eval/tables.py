"""Result tables, each written three ways (CSV for spreadsheets, JSON for scripts, Markdown for reading),
every file atomically so an interrupted write never leaves a half table behind."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_json, atomic_write_text


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(folder: Path, name: str, rows: list[dict], columns: list[str], title: str,
                meta: dict | None = None) -> None:
    """folder/name.csv, .json and .md."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: ("" if row.get(c) is None else row.get(c)) for c in columns} for row in rows])
    atomic_write_text(folder / f"{name}.csv", buffer.getvalue())
    atomic_write_json(folder / f"{name}.json", {"title": title, **(meta or {}), "rows": rows})
    atomic_write_text(folder / f"{name}.md", f"# {title}\n\n" + markdown_table(rows, columns))
