"""The web app in a real browser: Debian's headless Chromium driven by Playwright (no browser download).

Starts `tokenbooth ui` on a free port, uploads the demo subject's pictures, trains mini for a few steps,
reloads the page and opens a second tab mid-training (the job is the server's, not the page's), waits for the
adapter, draws 2 images and downloads one as a PNG with its settings.

    python tests/test_ui_browser.py docs/    # the same walk on a quick real training, screenshots into docs/
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 240_000  # generous for a loaded CI machine; a normal run takes under a minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(workspace: Path):
    """`tokenbooth ui` in a child process, as a user starts it; yields its address."""
    import tokenbooth

    port = free_port()
    src = str(Path(tokenbooth.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log = open(workspace.parent / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "tokenbooth", "ui", "--workspace", str(workspace),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None:
                raise RuntimeError(f"the app exited: {(workspace.parent / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    except BaseException:
        print("server log (tail):\n" + (workspace.parent / "server.log").read_text(errors="replace")[-3000:])
        for train_log in workspace.glob("subjects/*/train.log"):
            print(f"{train_log} (tail):\n" + train_log.read_text(errors="replace")[-2000:])
        raise
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def job_text(page) -> str:
    return page.inner_text("#job-status")


def wait_for_text(page, selector: str, *needles: str, timeout_ms: int = TIMEOUT_MS) -> str:
    """Waits until the element's text holds one of `needles`; returns that text."""
    checks = " || ".join(f"t.includes({n!r})" for n in needles)
    page.wait_for_function(f"(() => {{ const e = document.querySelector({selector!r}); "
                           f"const t = e ? e.innerText : ''; return {checks}; }})()", timeout=timeout_ms)
    return page.inner_text(selector)


def upload_demo_subject(page) -> None:
    from tokenbooth.assets import DEMO_SUBJECT_DIR

    page.wait_for_selector("#start")
    page.set_input_files("#references input[type=file]", sorted(str(p) for p in DEMO_SUBJECT_DIR.glob("*.png")))
    assert "5 image(s) ready" in wait_for_text(page, "#upload-message", "ready")
    page.fill("#class-word textarea", "robot")


def personalize(page, url: str, stage1: int, stage2: int, screenshots: Path | None = None) -> None:
    """Uploads the demo subject, starts a training, reloads mid-way and checks a second tab, waits for the end."""
    page.goto(url)
    upload_demo_subject(page)
    page.click("#advanced .label-wrap")  # the accordion opens on its header
    page.fill("#stage1-steps input", str(stage1))
    page.fill("#stage2-steps input", str(stage2))
    page.click("#start")
    assert "robot" in wait_for_text(page, "#start-message", "robot")
    wait_for_text(page, "#job-status", "training")

    page.reload()  # the job belongs to the server: a fresh page finds it still running
    page.wait_for_selector("#start")
    assert "robot: training" in wait_for_text(page, "#job-status", "training", "finished")
    other = page.context.new_page()  # and so does a second tab
    other.goto(url)
    assert "robot" in wait_for_text(other, "#job-status", "training", "finished")
    other.close()
    if screenshots is not None:  # mid-training, validation pictures drawn, pictures for a next subject dropped
        upload_demo_subject(page)
        page.wait_for_function("document.querySelectorAll('#validation img').length >= 2", timeout=TIMEOUT_MS)
        time.sleep(2)
        page.screenshot(path=str(screenshots / "ui-personalize.png"), full_page=True)
    wait_for_text(page, "#job-status", "finished", "failed")
    assert "robot: finished" in job_text(page), job_text(page)


def generate_two(page, url: str, compare: bool = False) -> list[Path]:
    """Draws 2 images of the trained subject; returns the PNGs downloaded from the page."""
    page.click("#tab-generate-button")
    page.wait_for_function("document.querySelector('#gen-subject input').value.startsWith('robot')",
                           timeout=TIMEOUT_MS)
    page.fill("#prompt textarea", "a [V] robot on the beach")
    page.fill("#num-images input[type=number]", "2")
    page.press("#num-images input[type=number]", "Enter")
    if compare:
        page.check("#compare input")
    page.click("#generate")
    assert "2 image(s)" in wait_for_text(page, "#gen-message", "image(s)", "Error")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=TIMEOUT_MS)
    downloads = []
    links = page.locator("#downloads a[download]")
    for i in range(links.count()):
        with page.expect_download() as info:
            links.nth(i).click()
        downloads.append(Path(info.value.path()))
    return downloads


def new_page(browser):
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, accept_downloads=True)
    context.set_default_timeout(TIMEOUT_MS)
    return context.new_page()


@pytest.fixture
def browser_page():
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium missing: install Debian's `chromium` package (apt-get install chromium)")
    pytest.importorskip("gradio", reason="the web app needs gradio: pip install -e '.[ui]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = new_page(browser)
        yield page
        browser.close()


def test_personalize_then_generate_in_a_real_browser(browser_page, tmp_path):
    from tokenbooth.ui.models import read_png_settings

    with served_app(tmp_path / "ws") as url:
        personalize(browser_page, url, stage1=6, stage2=4)
        downloads = generate_two(browser_page, url)
    assert len(downloads) == 2
    assert downloads[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = read_png_settings(downloads[0])
    assert settings["prompt"] == "a [V] robot on the beach" and settings["subject"] == "robot"


def take_screenshots(out: Path) -> None:
    """The README's pictures: each tab after a quick real training (mini's quick preset)."""
    import tempfile

    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = new_page(browser)
        with served_app(Path(tmp) / "ws") as url:
            personalize(page, url, stage1=50, stage2=12, screenshots=out)
            generate_two(page, url, compare=True)
            time.sleep(1.5)
            page.screenshot(path=str(out / "ui-generate.png"), full_page=True)
            page.click("#tab-subjects-button")
            page.wait_for_function("document.querySelectorAll('#subject-refs img').length === 5")
            wait_for_text(page, "#subject-summary", "finished adapter")
            time.sleep(1.5)
            page.screenshot(path=str(out / "ui-subjects.png"), full_page=True)
        browser.close()


if __name__ == "__main__":
    take_screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
