"""The wheel carries every asset the code reads: each file under tokenbooth/assets matches a package-data
pattern of pyproject.toml (a folder left out there is missing from every non-editable install)."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "tokenbooth" / "assets"


def package_data_patterns() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["package-data"]["tokenbooth.assets"]


def unpackaged(files: list[str], patterns: list[str]) -> list[str]:
    return [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]


def asset_files() -> list[str]:
    return sorted(str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*")
                  if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts)


def test_every_shipped_asset_file_is_listed_in_package_data():
    files = asset_files()
    assert {f.split("/")[0] for f in files} >= {"mini", "toyclip", "toydino", "reader", "demo_subject"}
    assert unpackaged(files, package_data_patterns()) == []


def test_a_folder_missing_from_package_data_is_caught():
    patterns = [p for p in package_data_patterns() if not p.startswith("reader/")]
    assert "reader/reader.safetensors" in unpackaged(asset_files(), patterns)
