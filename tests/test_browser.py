"""The Gradio app in a real browser: Debian's chromium driven by Playwright (no browser
download). Fills the tabular form, uploads an image to the image and detection tabs,
reads the results, and saves a screenshot of each."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1280, "height": 1000})
        pg.set_default_timeout(30_000)
        pg.goto(server + "/")
        yield pg
        browser.close()


def test_tabular_form(page, served_repo, tmp_path):
    row = pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet").iloc[0]
    card = json.loads((served_repo / "models/tabular/model.json").read_text())
    page.get_by_role("tab", name="Tabular").click()
    for f in card["features"]:
        value = row[f["name"]]
        if f["type"] == "numeric":
            box = page.locator(f"#tab-{f['name']} input")
            box.fill("" if pd.isna(value) else str(value))
        elif not pd.isna(value):
            dropdown = page.locator(f"#tab-{f['name']} input")
            dropdown.click()
            page.get_by_role("option", name=str(value), exact=True).click()
    page.locator("#tab-predict").click()
    out = page.locator("#tab-out")
    page.wait_for_function("() => /Adelie|Chinstrap|Gentoo/.test(document.querySelector('#tab-out').innerText)")
    assert any(c in out.inner_text() for c in card["classes"])
    page.screenshot(path=str(tmp_path / "tabular.png"), full_page=True)
    assert (tmp_path / "tabular.png").stat().st_size > 10_000


def test_image_upload(page, served_repo, tmp_path):
    page.get_by_role("tab", name="Image").click()
    digit = sorted((served_repo / "data/demo/digits/4").iterdir())[0]
    page.locator("#img-in input[type=file]").set_input_files(str(digit))
    page.wait_for_function("() => /[0-9]/.test(document.querySelector('#img-out').innerText)")
    text = page.locator("#img-out").inner_text()
    assert any(str(d) in text for d in range(10)), text
    page.screenshot(path=str(tmp_path / "image.png"), full_page=True)


def test_detection_upload(page, served_repo, tmp_path):
    page.get_by_role("tab", name="Detection").click()
    scene = sorted((served_repo / "data/prepared/detect/images/test").iterdir())[0]
    page.locator("#det-in input[type=file]").set_input_files(str(scene))
    page.wait_for_selector("#det-img img", timeout=30_000)
    headers = page.locator("#det-table").inner_text()
    assert "category" in headers and "score" in headers
    page.screenshot(path=str(tmp_path / "detect.png"), full_page=True)
