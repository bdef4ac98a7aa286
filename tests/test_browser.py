"""The Gradio app in a real browser: Debian's chromium driven by Playwright (no browser
download). Checks that the form starts at the training medians with the ranges in its
labels, that an out-of-range value shows a warning beside the prediction, that each tab's
examples run, that a wrong upload gets a sentence, and that the Models tab shows its
plots; saves a small screenshot of each under metrics/ui/ (tracked, for reviewers)."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ROOT / "metrics" / "ui"


def shot(page, name: str) -> None:
    """A screenshot as a small palette PNG (tens of kB, fine to keep in git)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    im = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    im.quantize(64).save(SHOTS / f"{name}.png", optimize=True)
    assert (SHOTS / f"{name}.png").stat().st_size > 5_000


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 800})
        pg.set_default_timeout(30_000)
        pg.goto(server + "/")
        yield pg
        browser.close()


def test_tabular_form_defaults_warnings_and_examples(page, served_repo):
    card = json.loads((served_repo / "models/tabular/model.json").read_text())
    ref = card["reference"]["features"]
    page.get_by_role("tab", name="Tabular").click()
    mass = page.locator("#tab-body_mass_g input")
    assert (
        float(mass.input_value()) == ref["body_mass_g"]["median"]
    )  # starts at the training median
    assert (
        f"training {ref['body_mass_g']['min']:g} to {ref['body_mass_g']['max']:g}"
        in page.locator("#tab-body_mass_g").inner_text()
    )
    assert page.locator("#tab-island input").input_value() == ref["island"]["mode"]
    page.locator("#tab-predict").click()
    page.wait_for_function(
        "() => /inside the range/.test(document.querySelector('#tab-warnings').innerText)"
    )
    mass.fill("0")
    page.locator("#tab-predict").click()
    page.wait_for_function(
        "() => /body_mass_g = 0 is outside/.test(document.querySelector('#tab-warnings').innerText)"
    )
    assert any(c in page.locator("#tab-out").inner_text() for c in card["classes"])
    shot(page, "tabular-warning")
    # An example fills the form with a row of the demo data.
    page.locator("#tab-examples table tbody tr, #tab-examples button.gallery-item").first.click()
    page.wait_for_function("() => document.querySelector('#tab-body_mass_g input').value !== '0'")
    page.locator("#tab-predict").click()
    page.wait_for_function(
        "() => /inside the range/.test(document.querySelector('#tab-warnings').innerText)"
    )
    shot(page, "tabular-example")


def test_wrong_upload_gets_a_sentence(page, tmp_path):
    page.get_by_role("tab", name="Tabular").click()
    bad = tmp_path / "penguins.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not a table")
    page.locator("#tab-csv input[type=file]").set_input_files(str(bad))
    toast = page.locator(".toast-body, [data-testid='toast-body']").first
    toast.wait_for()
    text = toast.inner_text()
    assert "penguins.csv" in text and "/tmp/" not in text and "NoneType" not in text, text
    page.wait_for_timeout(600)  # the toast has faded in
    shot(page, "tabular-error")
    page.reload()  # no toast in the next screenshots


def test_image_example(page):
    page.get_by_role("tab", name="Image").click()
    page.locator("#img-examples table tbody tr, #img-examples button.gallery-item").first.click()
    page.wait_for_function("() => /[0-9]/.test(document.querySelector('#img-out').innerText)")
    page.wait_for_function(
        "() => /range|Check/.test(document.querySelector('#img-warnings').innerText)"
    )
    shot(page, "image")


def test_detection_example(page):
    page.get_by_role("tab", name="Detection").click()
    headers = page.locator("#det-table").inner_text()
    assert (
        "category" in headers and "score" in headers and "1\t2" not in headers
    )  # named, even when empty
    page.locator("#det-examples table tbody tr, #det-examples button.gallery-item").first.click()
    page.wait_for_selector("#det-img img", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#det-warnings').innerText.length > 0")
    shot(page, "detect")


def test_models_tab_shows_plots(page):
    page.get_by_role("tab", name="Models").click()
    page.locator("#models-tabular-confusion").wait_for()
    for plot in ("#models-tabular-curves", "#models-tabular-pr", "#models-detect-pr"):
        page.locator(plot).wait_for()
    page.wait_for_selector("#models-tabular-curves canvas, #models-tabular-curves svg")
    assert "Adelie" in page.locator("#models-tabular-confusion").inner_text()
    shot(page, "models")
