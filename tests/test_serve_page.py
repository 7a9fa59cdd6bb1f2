"""The page at `/` in a real headless browser (Chromium through Playwright): an image picked in the page is sent to
the server and its top labels are drawn as bars, the same labels `mlkd.load(...).predict` gives; a teacher's
detections are counted in the title. Runs where Playwright and a Chromium are installed (the system's
`chromium`, or Playwright's own); elsewhere it is skipped, saying which is missing. MLKD_PAGE_SCREENSHOT=path
saves the student page's screenshot; docs/images/serve_page.png is benchmarks/page_screenshot.py's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import mlkd
from mlkd.proposals.attach import open_split

pytest.importorskip("fastapi", reason="the serve extra (pip install 'mlkd[serve]') is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

from test_serve import Running  # noqa: E402

from mlkd.serve.app import ServeSettings, create_app  # noqa: E402


def chromium_path() -> str | None:
    return os.environ.get("MLKD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        except Exception as e:  # no system Chromium and no Playwright browser downloaded
            pytest.skip(f"no Chromium to drive (system chromium: {path}; Playwright: {str(e).splitlines()[0]})")
        yield browser
        browser.close()


def open_page(browser, url: str, image: Path, score: str | None = None):
    page = browser.new_page(viewport={"width": 1000, "height": 560})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"external request {r.url}") if not r.url.startswith(url) and
            not r.url.startswith(("blob:", "data:")) else None)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
    if score is not None:
        page.fill("#score", score)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#labels .bar")
    return page, errors


def test_the_page_shows_the_labels_predict_gives(browser, trained):
    image = Path(open_split(str(trained.data.val)).records[0].path)
    clf = mlkd.load(trained.student)
    with Running(create_app(clf, ServeSettings())) as running:
        page, errors = open_page(browser, running.url, image)
        names = page.locator("#labels .bar .name span:first-child").all_inner_texts()
        percents = page.locator("#labels .bar .name span:last-child").all_inner_texts()
        assert page.locator("#view").is_visible()
        page.close()
    expected = clf.predict(image, top_k=10)
    assert names == list(expected)
    assert percents == [f"{100 * p:.1f} %" for p in expected.values()]
    assert not errors, errors


def test_the_page_draws_a_teachers_detections(browser, trained):
    det = mlkd.load(trained.teacher)
    image = Path(open_split(str(trained.data.val)).records[0].path)
    with Running(create_app(det, ServeSettings())) as running:
        page, errors = open_page(browser, running.url, image, score="0.001")  # the tiny teacher scores low
        title = page.locator("#title").text_content()  # as written (the CSS shows it upper-case)
        names = page.locator("#labels .bar .name span:first-child").all_inner_texts()
        page.close()
    found = det.detect(image, score_threshold=0.001)
    assert len(found["boxes"]) > 0
    assert title == f"Labels · {len(found['boxes'])} detections"
    assert names == sorted(found["image_scores"], key=found["image_scores"].get, reverse=True)[:10]
    assert not errors, errors
