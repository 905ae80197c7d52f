"""The web app in a real browser: Debian's headless Chromium driven by Playwright (no browser download).

Starts `tokenbooth ui` on a free port, uploads the demo subject's pictures (and an unreadable file, which is
taken out of the list), trains mini for a few steps, reloads the page and opens a second tab mid-training (the
job is the server's, not the page's: the form comes back too), waits for the adapter and its captioned
validation pictures, draws 2 images and downloads one as a PNG with its settings, renames the subject in the
Subjects tab, and checks that the page threw no script error on the way.

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


def upload_demo_subject(page, unreadable: Path | None = None) -> None:
    """The demo subject's 5 pictures (and `unreadable`, a file the page must leave out, naming it)."""
    from tokenbooth.assets import DEMO_SUBJECT_DIR

    page.wait_for_selector("#start")
    files = sorted(str(p) for p in DEMO_SUBJECT_DIR.glob("*.png")) + ([str(unreadable)] if unreadable else [])
    page.set_input_files("#references input[type=file]", files)
    message = wait_for_text(page, "#upload-message", "ready")
    assert "5 image(s) ready" in message
    if unreadable is not None:
        message = wait_for_text(page, "#upload-message", "Left out of the list")
        assert unreadable.name in message
        page.wait_for_function(f"!document.querySelector('#references').innerText.includes({unreadable.name!r})")
    page.fill("#class-word textarea", "robot")


def personalize(page, url: str, stage1: int, stage2: int, screenshots: Path | None = None,
                unreadable: Path | None = None) -> None:
    """Uploads the demo subject, starts a training, reloads mid-way and checks a second tab, waits for the end."""
    page.goto(url)
    upload_demo_subject(page, unreadable)
    page.click("#advanced .label-wrap")  # the accordion opens on its header
    page.fill("#stage1-steps input", str(stage1))
    page.fill("#stage2-steps input", str(stage2))
    page.click("#start")
    assert "robot" in wait_for_text(page, "#start-message", "robot")
    wait_for_text(page, "#job-status", "training")

    page.reload()  # the job belongs to the server: a fresh page finds it still running, and the form it started
    page.wait_for_selector("#start")
    assert "robot: training" in wait_for_text(page, "#job-status", "training", "finished")
    if "robot: training" in job_text(page):
        page.wait_for_function("document.querySelector('#class-word textarea').value === 'robot'")
        page.wait_for_function("document.querySelectorAll('#thumbs img').length === 5")
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
    page.wait_for_function("document.querySelectorAll('#validation .caption-label').length >= 2")
    cut = page.evaluate("Array.from(document.querySelectorAll('#validation .caption-label'))"
                        ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)")
    assert cut == [], f"validation captions cut off: {cut}"


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


def pick_subject(page, name: str) -> None:
    page.click("#subject-pick input")
    page.locator(f"ul li:has-text({name!r})").first.click()
    wait_for_text(page, "#subject-summary", f"{name}:")


def rename_in_subjects(page) -> None:
    """Picks the subject cancelled before its first step and back (a loss plot with nothing to draw after one
    with a curve: Gradio's plot threw "reading 'offsetWidth'" there), then renames the trained one to a name
    that is not a folder name as typed: the page says the folder's name, and the message stays (the subject
    list's update must not wipe it)."""
    page.click("#tab-subjects-button")
    for name in ("robot", "cancelled", "robot"):
        pick_subject(page, name)
    wait_for_text(page, "#subject-summary", "finished adapter")
    page.fill("#new-name textarea", "my robot!")
    page.click("#rename")
    message = wait_for_text(page, "#subjects-message", "Renamed", "Error")
    assert "**" not in message and "my-robot (folder name for 'my robot!')" in message, message
    time.sleep(2)  # the pick's change event has run by now
    assert "Renamed robot" in page.inner_text("#subjects-message")


@pytest.fixture
def browser_page():
    if not CHROMIUM.exists():
        pytest.skip("headless Chromium missing: install Debian's `chromium` package (apt-get install chromium)")
    pytest.importorskip("gradio", reason="the web app needs gradio: pip install -e '.[ui]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        page = new_page(browser)
        page.script_errors = []  # what the page threw: a tab switch or a pick must throw nothing
        page.on("pageerror", lambda error: page.script_errors.append(str(error)))
        yield page
        browser.close()


def test_personalize_then_generate_in_a_real_browser(browser_page, tmp_path):
    from tokenbooth.ui.jobs import Job
    from tokenbooth.ui.models import read_png_settings
    from tokenbooth.ui.workspace import Workspace

    unreadable = tmp_path / "not-a-picture.png"
    unreadable.write_bytes(b"this is not a PNG")
    workspace = Workspace(tmp_path / "ws")  # a subject whose training was cancelled before its first step
    workspace.create_subject("cancelled", [])
    Job("cancelled", "mini", ["--class-name", "dog"], state="cancelled").save(workspace)
    with served_app(workspace.root) as url:
        personalize(browser_page, url, stage1=6, stage2=4, unreadable=unreadable)
        downloads = generate_two(browser_page, url)
        rename_in_subjects(browser_page)
    assert browser_page.script_errors == []
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
