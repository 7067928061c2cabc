"""The web page in a real browser: Playwright (sync API) driving Debian's headless Chromium.

Chromium comes from `apt-get install chromium` (`make test-deps` does it as root); Playwright's
own browser download is never used. Without Chromium this test fails under CI (`CI=true`) and
skips with a loud reason elsewhere.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

from .helpers import ROOT

CHROMIUM = os.environ.get("LOOMLENS_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = ROOT / "docs" / "images" / "serve-page.png"
ARTEFACTS = Path(os.environ.get("LOOMLENS_TEST_ARTEFACTS", ROOT / "runs" / "test-artefacts"))


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser's path; checked before any server starts."""
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    problem = None
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        problem = (f"Chromium is missing at {CHROMIUM}: run `make test-deps` as root "
                   "(apt-get install chromium) or set LOOMLENS_CHROMIUM")
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the python package `playwright` is missing: pip install -e '.[dev]'"
    if problem:
        if in_ci:
            pytest.fail(f"BROWSER TEST CANNOT RUN IN CI: {problem}", pytrace=False)
        pytest.skip(f"BROWSER TEST SKIPPED: {problem}")
    return CHROMIUM


@contextmanager
def opened_page(chromium: str, url: str, errors: list[str]):
    """A page of headless Chromium on `url` (1360x1000, 30 s timeouts); page errors go to `errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.set_default_timeout(30_000)
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def test_page_detects_on_a_synthetic_frame(chromium, server, frames):
    from playwright.sync_api import expect

    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "serve-page.png"
    errors: list[str] = []
    with opened_page(chromium, server.url + "/", errors) as page:
        expect(page.locator("#run-button")).to_be_visible()
        # the example gallery shows synthetic frames
        expect(page.locator("img[src*='frame_0']").first).to_be_visible()
        # upload a synthetic frame, keep the default task (object detection), run
        page.locator("#input-image input[type=file]").set_input_files(str(frames[0]))
        expect(page.locator("#input-image img").first).to_be_visible()
        expect(page.locator("#task input")).to_have_value("Object detection (od)")
        page.locator("#run-button").click()
        # the drawn result and the detection table appear
        result = page.locator("#output-image img").first
        expect(result).to_be_visible()
        page.wait_for_function(
            "() => { const i = document.querySelector('#output-image img');"
            " return i && i.complete && i.naturalWidth > 0; }")
        size = result.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        expect(page.locator("#status")).to_contain_text("detection")
        status = page.locator("#status").inner_text()
        assert re.search(r"defect probability [01]\.\d\d", status), status  # the frame's OK/NG score
        headers = page.locator("#detections [role=columnheader]")
        expect(headers.first).to_contain_text("label")
        expect(headers.nth(1)).to_contain_text("score")
        rows = page.locator("#detections [role=row][data-index]")  # body rows of the grid
        n_reported = int(re.search(r"(\d+) detections?\b", status).group(1))
        if n_reported:
            # The grid renders only the rows in view (about two dozen), so a long answer
            # shows a prefix of the table: at least one row, never more than reported.
            expect(rows.first).to_be_visible()
            assert rows.count() <= n_reported
        # a task that needs text: pick it in the dropdown, type the phrase, run again
        page.locator("#task input").click()
        page.get_by_role("option", name="Phrase grounding (phrase_grounding)").click()
        expect(page.locator("#text-input label, #text-input span").first).to_contain_text("needed")
        page.locator("#text-input textarea, #text-input input").first.fill("drop")
        page.locator("#run-button").click()
        expect(page.locator("#status")).to_contain_text("Phrase grounding")
        expect(page.locator("#output-image img").first).to_be_visible()
        page.wait_for_function("() => document.querySelectorAll('.pending, .generating').length === 0")
        page.wait_for_timeout(400)  # let the fade-in of the new result finish
        page.screenshot(path=str(shot), full_page=True)
    assert size == [768, 432], size  # the drawn frame comes back at the frame's own size
    assert not errors, errors
    assert shot.stat().st_size > 20_000
    # The README's picture: written when missing, or refreshed on request.
    if not DOCS_SCREENSHOT.exists() or os.environ.get("LOOMLENS_UPDATE_DOCS_IMAGES") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def test_line_view_lists_the_watchers_events(chromium, tmp_path):
    """The Line tab in a real browser, on a server reading a watcher's database: the events of
    the last 24 hours, newest first, and the camera filter."""
    from datetime import UTC, datetime

    from playwright.sync_api import expect

    from .helpers import start_server, write_events_db

    db = write_events_db(tmp_path, now=datetime.now(UTC).replace(microsecond=0))
    server = start_server("line", ["--events-db", str(db), "--examples", "0"], tmp_path)
    errors: list[str] = []
    try:
        server.wait_ready()
        with opened_page(chromium, server.url + "/", errors) as page:
            page.get_by_role("tab", name="Line").click()
            expect(page.locator("#line-count")).to_contain_text("2 events shown")  # the 30 h old one is out
            expect(page.locator("#line-events")).to_contain_text("loom2")
            expect(page.locator("#line-gallery img").first).to_be_visible()  # the newest event's crop
            page.locator("#line-camera input").click()
            page.get_by_role("option", name="loom2").click()
            expect(page.locator("#line-count")).to_contain_text("1 event shown")
            ARTEFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTEFACTS / "serve-line.png"), full_page=True)
    finally:
        server.stop()
    assert not errors, errors
