"""The Gradio app and the API docs in a real browser: Debian's chromium driven by Playwright
(no browser download), with every request outside the server blocked.

Each tab is visited empty, with a result, with a warning and with an error; axe-core (the
copy that axe-playwright-python ships, injected into the page: no CDN) checks each state,
and the test fails on any serious or critical violation. The states' screenshots (small
palette PNGs) and axe's own JSON per state go to .cache/ui/.

`make screenshots` (after `make run`) runs it with UI_DEMO set to a checkout: the app serves
that checkout's demo models instead of the tiny ones, every result state must show a right
answer (the example's own label, the scene's own objects), and the screenshots and axe.json
go to docs/ui/, which the README shows.
It also checks that the form starts at the training medians with the ranges in its labels,
that a wrong upload gets a sentence, that the Models tab shows its plots, and that /docs
and /redoc render offline."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, serving

from stages.core import layout
from stages.core.card import read_card
from stages.core.params import TASKS

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
DEMO = Path(os.environ["UI_DEMO"]).resolve() if os.environ.get("UI_DEMO") else None
SHOTS = ROOT / "docs" / "ui" if DEMO else ROOT / ".cache" / "ui"
AXE: list[dict] = []  # one axe result per tab and state, written by the last test
TOAST = ".toast-body, [data-testid='toast-body']"


def shot(page, name: str) -> None:
    """A screenshot as a small palette PNG (tens of kB, fine to keep in git)."""
    from PIL import Image

    SHOTS.mkdir(parents=True, exist_ok=True)
    im = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    im.quantize(64).save(SHOTS / f"{name}.png", optimize=True)
    assert (SHOTS / f"{name}.png").stat().st_size > 5_000


def check(page, name: str) -> None:
    """axe-core over the page in this state; a serious or critical violation fails the test."""
    from axe_playwright_python.sync_playwright import Axe

    # Gradio dims an output while it updates (opacity): wait until nothing is pending.
    page.wait_for_function("() => !document.querySelector('.pending, .generating')")
    page.wait_for_timeout(400)
    result = Axe().run(page).response
    AXE.append({"state": name, **result})
    shot(page, name)
    bad = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not bad, f"{name}: " + "; ".join(bad)


if DEMO:  # the demo models `make run` trained, in place of the tiny ones (conftest)

    @pytest.fixture(scope="module")
    def served_repo() -> Path:
        missing = [t for t in TASKS if not (DEMO / layout.model_onnx(t)).is_file()]
        if missing:
            pytest.fail(f"UI_DEMO={DEMO} has no model for {', '.join(missing)}: `make run` first")
        return DEMO

    @pytest.fixture(scope="module")
    def server(served_repo):
        with serving(served_repo) as url:
            yield url


def top_label(page, out: str) -> str:
    """The class a gr.Label shows on top."""
    return page.locator(f"#{out} [data-testid='label-output-value']").inner_text().strip()


def offline(server: str):
    def route(r):
        if r.request.url.startswith(server):
            return r.continue_()
        return r.abort()

    return route


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    if not shutil.which("chromium") and not shutil.os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1100, "height": 800})
        pg.route("**/*", offline(server))  # nothing but the server: an offline host
        pg.set_default_timeout(30_000)
        pg.goto(server + "/")
        yield pg
        browser.close()


def error_toast(page) -> str:
    toast = page.locator(TOAST).first
    toast.wait_for()
    page.wait_for_timeout(600)  # the toast has faded in
    return toast.inner_text()


def test_tabular_states(page, served_repo, tmp_path):
    card = json.loads((served_repo / "models/tabular/model.json").read_text())
    ref = card["reference"]["features"]
    page.get_by_role("tab", name="Tabular").click()
    mass = page.locator("#tab-body_mass_g input")
    assert float(mass.input_value()) == ref["body_mass_g"]["median"]  # the training median
    label = f"training {ref['body_mass_g']['min']:g} to {ref['body_mass_g']['max']:g}"
    assert label in page.locator("#tab-body_mass_g").inner_text()
    assert page.locator("#tab-island input").input_value() == ref["island"]["mode"]
    check(page, "tabular-empty")
    page.locator("#tab-examples table tbody tr, #tab-examples button.gallery-item").first.click()
    page.locator("#tab-predict").click()
    page.wait_for_function(
        "() => /inside the range/.test(document.querySelector('#tab-warnings').innerText)"
    )
    if DEMO:  # the first example is the source's first row: its own label is the right answer
        import pandas as pd

        rows = pd.read_csv(served_repo / card["data"]["source"], sep=None, engine="python", nrows=1)
        assert top_label(page, "tab-out") == str(rows[card["target"]].iloc[0]).strip()
    check(page, "tabular-result")
    mass.fill("0")
    page.locator("#tab-predict").click()
    page.wait_for_function(
        "() => /body_mass_g = 0 is outside/.test(document.querySelector('#tab-warnings').innerText)"
    )
    assert any(c in page.locator("#tab-out").inner_text() for c in card["classes"])
    check(page, "tabular-warning")
    bad = tmp_path / "penguins.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not a table")
    page.locator("#tab-csv input[type=file]").set_input_files(str(bad))
    text = error_toast(page)
    assert "penguins.csv" in text and "/tmp/" not in text and "NoneType" not in text, text
    check(page, "tabular-error")
    page.reload()  # no toast in the next states


def image_states(page, tab: str, prefix: str, out: str, tmp_path, served_repo) -> None:
    from PIL import Image

    key = {"image": "img", "detect": "det"}[prefix]
    page.get_by_role("tab", name=tab).click()
    check(page, f"{prefix}-empty")
    page.locator(
        f"#{key}-examples table tbody tr, #{key}-examples button.gallery-item"
    ).first.click()
    page.wait_for_function(
        f"() => document.querySelector('#{out}').innerText.length > 0 || document.querySelector('#{out} img')"
    )
    page.wait_for_function(
        f"() => /range|Check|objects/.test(document.querySelector('#{key}-warnings').innerText)"
    )
    if DEMO:
        right_answer(page, prefix, served_repo)
    check(page, f"{prefix}-result")
    odd = tmp_path / f"{prefix}-wide.png"
    # Wider than the image suite allows, and grey where detection trained on colour.
    Image.new("L", (5000, 12), 200).save(odd)
    page.locator(f"#{key}-in input[type=file]").set_input_files(str(odd))
    page.wait_for_function(
        f"() => /Check these inputs/.test(document.querySelector('#{key}-warnings').innerText)"
    )
    check(page, f"{prefix}-warning")
    page.reload()
    page.get_by_role("tab", name=tab).click()
    notes = tmp_path / "notes.png"
    notes.write_text("these are my notes, not an image")
    page.locator(f"#{key}-in input[type=file]").set_input_files(str(notes))
    text = error_toast(page)
    assert "notes.png is not an image" in text and "/tmp/" not in text and "PIL" not in text, text
    check(page, f"{prefix}-error")
    page.reload()


def right_answer(page, prefix: str, repo: Path) -> None:
    """The first example (the first image of the demo data) answered right: its folder's class
    (image); every box drawn one of the scene's objects (its YOLO label file) of the same class at
    IoU >= 0.5, missing at most one of a pile (detect, recall 0.87 on the demo's test split)."""
    from PIL import Image

    from app.ui import DETECT_COLUMNS, image_examples

    card = read_card(repo / layout.card(prefix))
    source = card.data.model_copy(update={"source": str(repo / card.data.source)})
    first = Path(image_examples(card.model_copy(update={"data": source}))[0])
    if prefix == "image":
        assert top_label(page, "img-out") == first.parent.name, first
        return
    root = first.parents[1]  # <source>/images/<name>.png, <source>/labels/<name>.txt
    names = yaml.safe_load((root / "data.yaml").read_text())["names"]
    w, h = Image.open(first).size
    truth = []  # (class, x, y, width, height) in pixels, as the table shows boxes
    for line in (root / "labels" / f"{first.stem}.txt").read_text().split("\n"):
        if line.strip():
            c, cx, cy, bw, bh = line.split()
            bw, bh = float(bw) * w, float(bh) * h
            truth.append((names[int(c)], float(cx) * w - bw / 2, float(cy) * h - bh / 2, bw, bh))
    # Gradio's table draws its visible cells as cell-<row>-<column>, in DETECT_COLUMNS' order.
    cells = page.eval_on_selector_all(
        "#det-table [data-testid^='cell-']",
        "cs => cs.map(c => [+c.dataset.row, +c.dataset.col, c.innerText.trim()])",
    )
    table: dict[int, dict] = {}
    for row, col, text in cells:
        table.setdefault(row, {})[DETECT_COLUMNS[col]] = text
    shown = [r for r in table.values() if r.get("category")]
    found = [
        max((t for t in truth if t[0] == r["category"]), key=lambda t: iou(r, t), default=None)
        for r in shown
    ]
    wrong = [r for r, t in zip(shown, found, strict=True) if t is None or iou(r, t) < 0.5]
    assert not wrong and len(set(found)) >= len(truth) - 1, (first, shown, truth)


def iou(row: dict, truth: tuple) -> float:
    """A table row's box against a ground-truth (class, x, y, width, height)."""
    x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
    _, tx, ty, tw, th = truth
    ix = max(0.0, min(x + w, tx + tw) - max(x, tx))
    iy = max(0.0, min(y + h, ty + th) - max(y, ty))
    return ix * iy / (w * h + tw * th - ix * iy)


def test_image_states(page, tmp_path, served_repo):
    image_states(page, "Image", "image", "img-out", tmp_path, served_repo)


def test_detection_states(page, tmp_path, served_repo):
    page.get_by_role("tab", name="Detection").click()
    headers = page.locator("#det-table").inner_text()
    assert (
        "category" in headers and "score" in headers and "1\t2" not in headers
    )  # named, even when empty
    image_states(page, "Detection", "detect", "det-img", tmp_path, served_repo)


def test_models_tab_shows_plots(page):
    page.get_by_role("tab", name="Models").click()
    page.locator("#models-tabular-confusion").wait_for()
    for plot in ("#models-tabular-curves", "#models-tabular-pr", "#models-detect-pr"):
        page.locator(plot).wait_for()
    page.wait_for_selector("#models-tabular-curves canvas, #models-tabular-curves svg")
    assert "Adelie" in page.locator("#models-tabular-confusion").inner_text()
    check(page, "models")


def test_docs_render_offline_and_axe_report(page, server):
    page.goto(server + "/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert page.locator(".opblock").count() > 10  # the operations rendered from local assets
    shot(page, "docs")
    page.goto(server + "/redoc")
    page.wait_for_selector("[role=menuitem], .menu-content li", timeout=30_000)
    assert "predict" in page.content().lower()
    states = {a["state"] for a in AXE}
    assert len(states) >= 13 and len(list(SHOTS.glob("*.png"))) >= 10, states
    (SHOTS / "axe.json").write_text(json.dumps(AXE) + "\n")
