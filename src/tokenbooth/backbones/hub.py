"""Published checkpoints in the local Hugging Face cache. tokenbooth only ever reads the cache
(`local_files_only`): it never downloads, with or without HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def hub_cache_dir() -> Path:
    """Where `hf download` puts repositories, read from the environment now (not at import), with
    huggingface_hub's precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_snapshot(repo_id: str, name: str) -> Path:
    """The folder of the newest cached snapshot of `repo_id`, or one line saying how to get it."""
    from huggingface_hub import snapshot_download  # here for start-up time: its hf_api costs `--help` ~0.3 s

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for "not in the cache"; all mean the same here
        raise UserError(f"model {name!r} is not in the Hugging Face cache ({cache}): fetch {repo_id} on a machine "
                        f"with internet (`hf download {repo_id}`) and copy the cache over, or pass "
                        f"--model PATH to its folder (docs/gpu.md)") from None


def cached_file(repo_id: str, filename: str) -> Path | None:
    """One file of a cached repository, or None."""
    from huggingface_hub import try_to_load_from_cache  # start-up time, as above

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir())
    return Path(found) if isinstance(found, str) else None
