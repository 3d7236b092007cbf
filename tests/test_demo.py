"""The demo page in a real browser (Debian's chromium driven by playwright), and GET / for curl."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from conftest import make_tiny_bundle
from servers import Server

CHROMIUM = "/usr/bin/chromium"
CATS = ("tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau")


@pytest.fixture(scope="module")
def demo_server(default_bundle, tmp_path_factory):
    """The default model and a tiny one, side by side, in one repository."""
    root = tmp_path_factory.mktemp("demo")
    repo = root / "repo"
    shutil.copytree(default_bundle, repo / "efficientnet-lite0" / "1")
    make_tiny_bundle(repo / "tiny" / "1")
    server = Server(str(repo), log=root / "server.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_curl_gets_a_json_description(demo_server):
    reply = httpx.get(demo_server.url + "/")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    info = reply.json()
    assert {m["name"]: m["versions"] for m in info["models"]} == {"efficientnet-lite0": ["1"], "tiny": ["1"]}
    assert info["endpoints"]["upload"].startswith("POST /")


def test_a_browser_gets_the_page_and_a_cat_is_a_cat(demo_server, browser, images, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 760})
    page.goto(demo_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")
    page.select_option("#model", "efficientnet-lite0")
    page.set_input_files("#file", str(images["cat"]))
    page.wait_for_selector("#bars .bar")
    labels = page.locator("#bars .bar .name").all_inner_texts()
    assert len(labels) == 5 and labels[0] in CATS
    meta = page.inner_text("#meta")
    assert "efficientnet-lite0 version 1" in meta and "decode" in meta and "infer" in meta
    # (docs/demo-page.png is this screenshot, taken once by hand: tests do not write into the checkout)
    page.screenshot(path=str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000

    # Switching the model answers the same image again, with the other model's labels.
    page.select_option("#model", "tiny")
    page.wait_for_function("document.querySelector('#meta').textContent.includes('tiny version 1')")
    assert all(name.startswith("class") for name in page.locator("#bars .bar .name").all_inner_texts())
    page.close()


def test_a_text_file_shows_the_servers_error(demo_server, browser, tmp_path):
    note = tmp_path / "notes.txt"
    note.write_text("this is not an image")
    page = browser.new_page()
    page.goto(demo_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length == 2")
    page.set_input_files("#file", str(note))
    page.wait_for_selector("#error:not([hidden])")
    error = page.inner_text("#error")
    assert error.startswith("400") and "image" in error.lower()
    assert page.locator("#result").is_hidden()
    page.close()
