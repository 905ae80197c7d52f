"""The attribute reader's verdict on `tokenbooth demo`'s grid, so anyone can check what the demo shows.

Every cell is read by the shipped reader (reader.py) and scored as toy-bench scores a picture
(`toybench.reading_scores`): each identity attribute against the demo subject's own (its toyworld instance),
all of them at once, and what the prompt asked for (the background; the body color and the accessory where a
prompt asks for them; an asked body color is no longer the subject's to keep). The references row is the
ceiling (the reader on the subject's own pictures), the base model's row the floor (a robot never taught the
subject).
"""

from __future__ import annotations

from .reader import IDENTITY
from .toybench import reading_scores

# how the printed lines name the reader's identity attributes
NAMES = {"cls": "class", "color": "body color", "accent": "accent", "pattern": "pattern",
         "proportion": "proportion", "variant": "parts"}
KINDS = ("references", "base", "personalized")


def judge_rows(reader, inst, rows: list[dict]) -> dict:
    """The demo's figures, JSON-ready. reader: anything with `read(images) -> [{attribute: value}]`; inst: the
    demo subject's toyworld instance; rows: in the grid's order, each {"label", "kind" (one of KINDS),
    "asks" (None, or {attribute: value} the prompt asked for), "images"}. Returns the subject's attributes,
    per row its figures and what the reader read in each cell (left to right), and per kind the figures of all
    its cells together ("overall"; "personalized" is the demo's headline)."""
    out_rows, cells_by_kind = [], {kind: [] for kind in KINDS}
    for row in rows:
        readings = reader.read(row["images"])
        cells = [cell(reading, inst, row["asks"]) for reading in readings]
        cells_by_kind[row["kind"]] += cells
        out_rows.append({"label": row["label"], "kind": row["kind"], "asks": row["asks"], **figures(cells),
                         "readings": readings})
    return {"subject": {a: getattr(inst, a) for a in IDENTITY}, "rows": out_rows,
            "overall": {kind: figures(cells) for kind, cells in cells_by_kind.items() if cells}}


def cell(reading: dict, inst, asks: dict | None) -> dict:
    """One picture: toy-bench's scores, and which asked attributes the reader read back."""
    scores = reading_scores(reading, inst, asks)
    return {"identity": scores["identity"], "identity_all": bool(scores["identity_all"]),
            "attributes": scores["attributes"], "asked": {a: reading[a] == v for a, v in (asks or {}).items()}}


def count(rights: list[bool]) -> dict:
    return {"right": sum(rights), "of": len(rights), "share": sum(rights) / len(rights)}


def figures(cells: list[dict]) -> dict:
    """Counts over some cells: all identity right, each identity attribute (over the cells that keep it),
    each asked attribute (over the cells that ask it); and the mean share of identity attributes read right."""
    asked = dict.fromkeys(a for c in cells for a in c["asked"])  # in the order the prompts ask them
    return {"images": len(cells),
            "identity_all": count([c["identity_all"] for c in cells]),
            "identity": sum(c["identity"] for c in cells) / len(cells),
            "attributes": {a: count([c["attributes"][a] for c in cells if a in c["attributes"]])
                           for a in IDENTITY if any(a in c["attributes"] for c in cells)},
            "asked": {a: count([c["asked"][a] for c in cells if a in c["asked"]]) for a in asked}}


def verdict_line(label: str, figs: dict, asks: dict | None = None) -> str:
    """E.g. "[V] robot on the beach  all identity right 2/5 (class 5/5, body color 3/5, ...); asked background
    beach 5/5" (label: padded by the caller, to line the rows up)."""
    def n(c: dict) -> str:
        return f"{c['right']}/{c['of']}"

    line = (f"{label}  all identity right {n(figs['identity_all'])} ("
            + ", ".join(f"{NAMES[a]} {n(c)}" for a, c in figs["attributes"].items()) + ")")
    if figs["asked"]:
        line += "; asked " + ", ".join(f"{NAMES.get(a, a)}{' ' + str(asks[a]) if asks else ''} {n(c)}"
                                       for a, c in figs["asked"].items())
    return line


def verdict_lines(judged: dict) -> list[str]:
    """What `tokenbooth demo` prints: a line per grid row, then the personalized cells together."""
    together = "all personalized cells"
    width = max(len(label) for label in [together, *(row["label"] for row in judged["rows"])])
    lines = ["the attribute reader's verdict (cells read as the demo subject; asked: what the prompt asked for):"]
    lines += [f"  {verdict_line(row['label'].ljust(width), row, row['asks'])}" for row in judged["rows"]]
    if "personalized" in judged["overall"]:
        lines.append(f"  {verdict_line(together.ljust(width), judged['overall']['personalized'])}")
    return lines
