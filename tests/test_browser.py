"""The search page in a real browser: Debian's chromium, headless, driven by Playwright, against a
real ``semdb serve`` (a subprocess) on a small Fashion-MNIST database with the bundled model.

``SEMDB_SCREENSHOT=docs/serve.png python3 -m pytest tests/test_browser.py`` also writes the
screenshot of the page that ``docs/`` shows.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import semdb
from semdb import fashion_mnist
from semdb.demo import write_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PER_CLASS = 20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
        reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
    ),
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="chromium not installed (apt-get install chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api")


def start_server(database: Path, thumbnails: Path) -> tuple[subprocess.Popen[str], str]:
    """``semdb serve`` on a free port; returns the process and the URL it printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "semdb.cli", "serve", "--db", str(database), "--port", "0"]
    process = subprocess.Popen(
        [*command, "--thumbnails", str(thumbnails)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout=300):
        process.kill()
        pytest.fail("semdb serve printed no address within 300 s")
    url = process.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"semdb serve did not start: {url!r} {process.stderr.read() if process.stderr else ''}")
    return process, url


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("served")
    write_images(root / "images", PER_CLASS * 10)
    with semdb.connect(root / "db.semdb", model="tiny-fashion", bits=128) as db:
        db.ingest(root / "images")
    process, url = start_server(root / "db.semdb", root / "thumbnails")
    try:
        yield url, root / "images"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def classes(page: Any, count: int = 10) -> list[str]:
    """The class folders of the first ``count`` results shown."""
    paths = page.eval_on_selector_all(".hit", "tiles => tiles.map(tile => tile.dataset.path)")
    return [Path(path).parent.name for path in paths[:count]]


def wait_for_thumbnails(page: Any, count: int) -> None:
    page.wait_for_function(
        "n => [...document.querySelectorAll('.hit img')].slice(0, n).every(img => img.complete && img.naturalWidth > 0)"
        " && document.querySelectorAll('.hit img').length >= n",
        arg=count,
    )


def search(page: Any, text: str) -> None:
    page.fill("#q", text)
    with page.expect_response(lambda response: "/api/search" in response.url):
        page.press("#q", "Enter")
    page.wait_for_selector(".hit")


def test_type_a_query_and_see_thumbnails_of_its_class(server: tuple[str, Path], page: Any) -> None:
    url, _ = server
    page.goto(url)
    page.wait_for_function("document.getElementById('stats').textContent.includes('images')")
    search(page, "an ankle boot")
    wait_for_thumbnails(page, 10)
    assert classes(page).count("ankle-boot") >= 8, classes(page)
    assert "?q=an+ankle+boot" in page.url
    assert "results for" in page.inner_text("#status")
    scores = [float(s) for s in page.eval_on_selector_all(".hit", "t => t.map(x => x.dataset.score)")]
    assert scores == sorted(scores, reverse=True)
    if os.environ.get("SEMDB_SCREENSHOT"):
        page.screenshot(path=os.environ["SEMDB_SCREENSHOT"])


def test_more_like_this_and_the_full_image(server: tuple[str, Path], page: Any) -> None:
    url, _ = server
    page.goto(f"{url}?q=a+handbag")
    page.wait_for_selector(".hit")
    first = page.locator(".hit").first
    chosen_id, chosen_path = first.get_attribute("data-id"), first.get_attribute("data-path")
    first.locator("img").click()
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("document.getElementById('full').naturalWidth > 0")
    assert page.inner_text("#full-path") == chosen_path
    page.click("#viewer .close")
    with page.expect_response(lambda response: "/api/search" in response.url):
        first.locator(".like").click()
    page.wait_for_function("id => document.querySelector('.hit').dataset.id === id", arg=chosen_id)
    assert page.input_value("#q") == f"id:{chosen_id}"
    assert classes(page).count(Path(str(chosen_path)).parent.name) >= 8, classes(page)


def test_a_filter_restricts_and_goes_into_the_url(server: tuple[str, Path], page: Any) -> None:
    url, images = server
    page.goto(url)
    search(page, "an ankle boot")
    page.click("#filters summary")
    page.fill("#under", str(images / "trouser"))
    with page.expect_response(lambda response: "/api/search" in response.url):
        page.press("#under", "Enter")
    page.wait_for_function("[...document.querySelectorAll('.hit')].every(t => t.dataset.path.includes('/trouser/'))")
    assert len(classes(page, 100)) == PER_CLASS and set(classes(page, 100)) == {"trouser"}
    assert "under=" in page.url
    # The URL is the query: opened afresh, it shows the same filtered results.
    shared = page.context.new_page()
    shared.goto(page.url)
    shared.wait_for_selector(".hit")
    assert shared.input_value("#under") == str(images / "trouser") and set(classes(shared, 100)) == {"trouser"}


def test_load_more_and_a_missing_original(server: tuple[str, Path], page: Any) -> None:
    url, images = server
    page.goto(f"{url}?q=a+shirt")
    page.wait_for_selector(".hit")
    assert page.locator(".hit").count() == 30
    with page.expect_response(lambda response: "/api/search" in response.url):
        page.click("#more")
    page.wait_for_function("document.querySelectorAll('.hit').length === 60")
    ids = page.eval_on_selector_all(".hit", "t => t.map(x => x.dataset.id)")
    assert len(set(ids)) == 60

    victim = sorted((images / "sandal").iterdir())[0]
    victim.unlink()
    page.goto(f"{url}?q=a+sandal&limit=50&under={images / 'sandal'}")
    page.wait_for_selector(".hit.missing")
    assert page.locator(".hit.missing").count() == 1
    assert page.locator(".hit.missing").get_attribute("data-path") == str(victim)
    assert "original missing" in page.inner_text(".hit.missing")


def test_a_refused_request_is_one_readable_line_on_the_page(server: tuple[str, Path], page: Any) -> None:
    url, _ = server
    # FastAPI refuses a non-integer width with a list of errors; the page shows its one line, not JSON.
    page.goto(f"{url}?q=a+bag&min_width=1.5")
    page.wait_for_selector("#status.error")
    shown = page.inner_text("#status")
    assert shown.startswith("min_width: ") and "[{" not in shown, shown
    page.goto(f"{url}?q=id:99999999999999999999")
    page.wait_for_selector("#status.error")
    assert "no image with id 99999999999999999999" in page.inner_text("#status")
