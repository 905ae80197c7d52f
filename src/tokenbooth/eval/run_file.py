"""A benchmark run's `run.json`: the settings that decide its images, recorded when the run starts, so that a
restart in the same output folder continues only the run it was started as (DreamBench and toy-bench)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json, read_json_object

RUN_FILE = "run.json"


def check_run_settings(out: Path, settings: dict, bench: str, write: bool = True, stamp: dict | None = None,
                       defaults: dict | None = None) -> None:
    """Refuses a restart whose settings differ from those `out`'s run.json holds, naming the first that does
    (with both values when they are short); with no run.json yet, records `settings` (after `stamp`'s fields,
    e.g. the version) unless `write` is False (a check before anything is written, or a process that is not
    the one writing files). `defaults` mirrors `settings`' nesting (toy-bench's per-row training settings)."""
    path = Path(out) / RUN_FILE
    if path.is_file():
        saved = read_json_object(path, f"{bench} settings").get("settings")
        if not isinstance(saved, dict):  # unreadable settings: refused as other ones
            saved, defaults = {}, {}
        if (changed := first_difference(saved, settings, defaults or {})) is not None:
            key, there, now = changed
            which = key if isinstance(there, (dict, list)) or isinstance(now, (dict, list)) \
                else f"{key}: {there!r} there, {now!r} now"
            raise UserError(f"{out} holds a {bench} run with other settings ({which}); use the same settings to "
                            f"continue it, or another --output")
    elif write:
        atomic_write_json(path, {**(stamp or {}), "settings": settings})


def first_difference(saved: dict, now: dict, defaults: dict, prefix: str = ""):
    """(key path, saved value, new value) of the first setting that differs, or None. A setting added after the
    run started (absent from its run.json) matches where it keeps its default: that run drew as the default does."""
    for key, value in now.items():
        default = defaults.get(key)
        there = saved[key] if key in saved else default
        if isinstance(there, dict) and isinstance(value, dict):
            inner = first_difference(there, value, default if isinstance(default, dict) else {}, f"{prefix}{key}.")
            if inner is not None:
                return inner
        elif there != value:
            return f"{prefix}{key}", saved.get(key), value
    return None
