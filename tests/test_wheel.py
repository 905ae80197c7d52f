"""The package as users install it: the wheel `pip wheel .` builds, installed non-editable into a fresh
virtualenv (the dependencies reused from this environment, no network), runs a smoke path that reads every
asset folder: mini (a short personalization), toyDINO (its validation fidelity), the demo subject (its
references), the attribute reader, toyCLIP, the published configs (a plan's blueprint) and the accelerate
config. A folder left out of package-data fails here, as it would for a user (tests/test_packaging.py checks
the patterns; this checks the wheel itself)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMOKE = textwrap.dedent('''
    import json, subprocess, sys
    from pathlib import Path

    import tokenbooth
    from tokenbooth import assets

    installed = Path(tokenbooth.__file__).resolve()
    assert "site-packages" in installed.parts, installed  # the wheel's copy, not the source tree
    out = Path(sys.argv[1])

    # mini, toyDINO, the demo subject: two stage-1 steps with a validation picture scored for fidelity
    done = subprocess.run([sys.executable, "-m", "tokenbooth", "train", "--model", "mini",
                           "--images", str(assets.DEMO_SUBJECT_DIR), "--class-name", "robot", "--output",
                           str(out / "run"), "--stages", "embedding", "--stage1-steps", "2", "--batch-size", "2",
                           "--validation-prompt", "a [V] robot", "--validation-steps", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fidelity = [json.loads(line) for line in (out / "run" / "fidelity.jsonl").read_text().splitlines()]
    assert fidelity and fidelity[0]["encoder"], fidelity

    from tokenbooth.eval.metrics import load_clip
    from tokenbooth.eval.reader import load_reader
    load_reader()  # the attribute reader
    load_clip(str(assets.TOYCLIP_DIR))  # toyCLIP

    from tokenbooth.plan.blueprints import blueprint, known_models
    from tokenbooth.plan.tracker import fake_run
    assert {"lumina-mgpt-7b-768", "janus-pro-7b"} <= set(known_models())
    with fake_run():
        blueprint("lumina-mgpt-7b-768", layers=1)  # a shipped config, built

    assert "fsdp" in assets.ACCELERATE_FSDP.read_text().lower()
    print("smoke ok", installed)
''')


def dependency_paths() -> list[str]:
    """This environment's site-packages (torch, transformers, ...), for the fresh venv to reuse without
    network; the source tree (an editable install's path) left out."""
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [p for p in sorted(paths) if Path(p).is_dir()]


def build_wheel(folder: Path) -> Path:
    """`pip wheel . --no-deps` on a copy of the project (setuptools leaves build/ in the tree it builds)."""
    source = folder / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    isolation = [] if importlib.util.find_spec("setuptools") else None  # without it here: pip's own isolated build
    argv = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(folder)]
    if isolation is not None:
        argv.insert(argv.index("--no-deps"), "--no-build-isolation")
    subprocess.run(argv, check=True, cwd=folder, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = folder.glob("tokenbooth-*.whl")
    return wheel


def test_the_installed_wheel_reads_every_asset_folder(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("mini", "reader", "toydino", "toyclip", "demo_subject", "configs", "accelerate"):
        assert any(n.startswith(f"tokenbooth/assets/{folder}/") for n in names), folder
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "reused_dependencies.pth").write_text("\n".join(dependency_paths()) + "\n")
    # pip from this environment installs into the venv's interpreter; --no-deps --no-index: nothing fetched
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    smoke = tmp_path / "smoke.py"
    smoke.write_text(SMOKE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(python), str(smoke), str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                          text=True, env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke ok" in done.stdout and str(venv) in done.stdout
