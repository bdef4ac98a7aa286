"""The Gradio app: a tab per task and a tab of model cards. Handlers are plain functions
(tested directly and through gradio_client); nothing is loaded at import.

The form starts at the training medians and modes (the model card's `reference`), each
label shows the training range, each tab has examples from the demo data, every answer
shows its input warnings, the Models tab shows the evaluation plots, and errors are
sentences."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from app.errors import BadInput
from app.explain_view import HEAT, WHY, bars, overlay, top_contributions
from app.label_issues import show as show_label_issues
from app.predict import Current, Loaded, predict_detect, predict_image, predict_tabular
from app.settings import Settings
from stages.core.card import Card
from stages.core.cli import StageError
from stages.core.images import image_extensions
from stages.core.trust import describe
from stages.detect.boxes import draw_boxes
from stages.image.infer import no_cam
from stages.tabular.data import read_csv

HEADLINE = ("accuracy", "f1_macro", "roc_auc", "rmse", "mae", "r2", "mAP50", "mAP50-95")
MAX_ZIP_IMAGES = 1000
DETECT_COLUMNS = ["category", "score", "x", "y", "width", "height"]
N_EXAMPLES = 3
# Contrast (WCAG AA, 4.5:1) where Gradio's default light theme falls short: the primary
# buttons (white on orange-500 is 2.8:1), the uploads' "- or -" and the footer's API link (1.9:1).
CSS = ".or, .show-api, .show-api * { color: #4b5563 !important; }"
# Gradio 6 puts aria-label on role-less divs (its "Empty value" boxes), renders image examples
# and output images as buttons without text, and nests the toast's Close button in a role=button header; axe-core
# flags all three as serious. Fixed in the page as they appear.
HEAD = """<script>
(() => {
  let queued = false;
  const fix = () => {
    queued = false;
    document.querySelectorAll('div[aria-label]:not([role])').forEach(e => e.setAttribute('role', 'img'));
    // The error toast's header is a role=button holding the Close button (nested controls).
    document.querySelectorAll('.toast-header[role="button"]').forEach(e => {
      e.removeAttribute('role'); e.removeAttribute('tabindex');
    });
    document.querySelectorAll('button.gallery-item').forEach((b, i) => {
      if (!b.innerText.trim() && !b.hasAttribute('aria-label')) b.setAttribute('aria-label', 'example ' + (i + 1));
    });
    // An output image is a button (it opens full size) holding only the image.
    document.querySelectorAll('.image-container button:not([aria-label])').forEach(b => {
      if (!b.innerText.trim()) b.setAttribute('aria-label', 'the image, full size');
    });
  };
  new MutationObserver(() => { if (!queued) { queued = true; requestAnimationFrame(fix); } })
    .observe(document.documentElement, {subtree: true, childList: true});
})();
</script>"""


def page_style() -> dict:
    """theme, css and head for gr.mount_gradio_app: the page's accessibility fixes, and only
    the system's fonts (nothing fetched from a font CDN)."""
    import gradio as gr

    theme = gr.themes.Default(
        primary_hue="blue",
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    ).set(
        button_primary_background_fill="*primary_700",
        button_primary_background_fill_hover="*primary_800",
        button_primary_text_color="white",
    )
    return {"theme": theme, "css": CSS, "head": HEAD}


def _error(e: Exception | str):
    """A message a person reads, as a sentence with its full stop."""
    import gradio as gr

    text = str(e).strip()
    return gr.Error(text if text.endswith((".", "?", "!")) else text + ".")


def _answer(predict, *args, **kw):
    """predict(...), its BadInput shown as the UI's error."""
    try:
        return predict(*args, **kw)
    except BadInput as e:
        raise _error(e) from None


def _need_file(path: str | None, what: str) -> str:
    if not path:
        raise _error(f"No file arrived: choose {what}")
    return path


def warnings_markdown(warnings: list[str], pred: dict | None = None) -> str:
    """The input warnings; first, for a model with trust, e.g. "Gentoo (set: Gentoo) · looks
    like training data" (stages/core/trust.py)."""
    if pred and "ood" in pred:
        return f"{pred['prediction']} {describe(pred)}\n\n" + warnings_markdown(warnings)
    if not warnings:
        return "All inputs are inside the range the model was validated on."
    return "**Check these inputs:**\n" + "\n".join(f"- {w}" for w in warnings)


def tabular_form(model: Loaded, *values) -> tuple[dict | float, str]:
    """One row from the form → ({class: probability} (gr.Label) or the predicted value, warnings)."""
    row = dict(zip([f.name for f in model.card.features], values, strict=False))
    try:
        pred = predict_tabular(model, [row])[0]
    except BadInput as e:
        raise _error(e) from None
    if model.card.kind == "classification":
        return {c: pred[f"p_{c}"] for c in model.card.classes}, warnings_markdown(
            pred["warnings"], pred
        )
    return pred["prediction"], warnings_markdown(pred["warnings"], pred)


def tabular_why(model: Loaded, *values) -> pd.DataFrame:
    """One row from the form → its top contributions, for a bar chart (docs/explain.md)."""
    row = dict(zip([f.name for f in model.card.features], values, strict=False))
    return top_contributions(_answer(predict_tabular, model, [row], explain=True)[0])


def looks_like_text(path: str) -> bool:
    """The file's first 64 kB are UTF-8 text without NUL bytes (a CSV), not an image or zip."""
    with open(path, "rb") as f:
        head = f.read(65536)
    try:
        head.decode()
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 64 kB boundary
            return False
    return b"\0" not in head


def tabular_csv(model: Loaded, path: str | None, max_rows: int) -> str:
    """An uploaded CSV → a CSV of predictions (line, prediction, probabilities, warnings), as a file."""
    _need_file(path, "a .csv file with the feature columns")
    if not looks_like_text(path):
        raise _error(f"{Path(path).name} is not a CSV file: it holds binary data, not text")
    try:
        df = read_csv(path)
        if len(df) > max_rows:
            raise BadInput(f"{len(df)} rows, more than the limit of {max_rows}")
        preds = pd.DataFrame(predict_tabular(model, df))
    except (BadInput, StageError) as e:
        raise _error(
            str(e).replace(str(path), Path(path).name)
        ) from None  # the name the user chose, not the cache path
    preds["warnings"] = preds["warnings"].map("; ".join)
    preds.insert(0, "line", df.index.to_numpy())
    out = Path(tempfile.mkdtemp()) / f"{Path(path).stem}-predictions.csv"
    preds.to_csv(out, index=False)
    return str(out)


def image_one(model: Loaded, path: str | None, k: int, max_pixels: int) -> tuple[dict, str]:
    _need_file(path, "an image file")
    result = _answer(predict_image, model, Path(path).read_bytes(), k, max_pixels)
    return {r["class"]: r["probability"] for r in result["top_k"]}, warnings_markdown(
        result["warnings"], result
    )


def image_why(model: Loaded, path: str | None, max_pixels: int):
    """The image with its predicted class's activation map laid over it (docs/explain.md)."""
    _need_file(path, "an image file")
    result = _answer(predict_image, model, Path(path).read_bytes(), 1, max_pixels, explain=True)
    return overlay(path, result["heatmap_png"])


def image_zip(model: Loaded, path: str | None, k: int, max_pixels: int) -> str:
    """A zip of images → CSV (name, prediction, probability, top_k, error). Entries are read
    in memory, never extracted, so no name in the archive can write anywhere."""
    exts, rows = image_extensions(), []
    _need_file(path, "a .zip file of images")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _error(BadInput("the upload is not a zip file")) from None
    with archive:
        names = [
            n for n in archive.namelist() if Path(n).suffix.lower() in exts and not n.endswith("/")
        ]
        if len(names) > MAX_ZIP_IMAGES:
            raise _error(BadInput(f"{len(names)} images, more than the limit of {MAX_ZIP_IMAGES}"))
        for name in names:
            try:
                r = predict_image(model, archive.read(name), k, max_pixels)
                rows.append(
                    {
                        "name": name,
                        "prediction": r["prediction"],
                        "probability": r["probability"],
                        "top_k": r["top_k_text"],
                        "error": None,
                    }
                )
            except BadInput as e:
                rows.append(
                    {
                        "name": name,
                        "prediction": None,
                        "probability": None,
                        "top_k": None,
                        "error": str(e),
                    }
                )
    out = Path(tempfile.mkdtemp()) / "predictions.csv"
    pd.DataFrame(rows, columns=["name", "prediction", "probability", "top_k", "error"]).to_csv(
        out, index=False
    )
    return str(out)


def detect_one(model: Loaded, path: str | None, conf: float, iou: float, max_pixels: int):
    """An image → (the image with boxes drawn, a table of detections, warnings)."""
    _need_file(path, "an image file")
    try:
        result = predict_detect(model, Path(path).read_bytes(), conf, iou, max_pixels)
    except BadInput as e:
        raise _error(e) from None
    found = result["detections"]
    dets = np.array(
        [
            [
                d["bbox"][0],
                d["bbox"][1],
                d["bbox"][0] + d["bbox"][2],
                d["bbox"][1] + d["bbox"][3],
                d["score"],
                d["category_id"],
            ]
            for d in found
        ]
    ).reshape(-1, 6)
    table = pd.DataFrame(
        [
            {
                "category": d["category"],
                "score": d["score"],
                "x": d["bbox"][0],
                "y": d["bbox"][1],
                "width": d["bbox"][2],
                "height": d["bbox"][3],
            }
            for d in found
        ],
        columns=DETECT_COLUMNS,
    )
    note = warnings_markdown(result["warnings"])
    if not found:
        note = f"No objects above confidence {conf:g}. " + note
    return draw_boxes(path, dets, model.card.classes), table, note


def form_defaults(card: Card) -> list[tuple[str, object]]:
    """(label, start value) per feature: the training median or mode, and the training range."""
    ref = (card.reference or {}).get("features", {})
    out = []
    for f in card.features:
        r = ref.get(f.name, {})
        if f.type == "numeric" and "min" in r:
            out.append((f"{f.name} (training {r['min']:g} to {r['max']:g})", r["median"]))
        elif f.type == "numeric":
            out.append((f.name, None))
        elif f.type in ("text", "datetime"):
            out.append((f"{f.name} ({f.type}{', ' + f.format if f.format else ''})", None))
        else:
            out.append((f"{f.name} (training: {', '.join(f.categories)})", r.get("mode")))
    return out


def tabular_examples(card: Card, n: int = N_EXAMPLES) -> list[list]:
    """A row per class (or the first rows) among the first 5,000 of the training CSV, as
    form values; none when the file is not at hand or does not fit the form."""
    try:
        df = pd.read_csv(
            card.data.source, sep=None, engine="python", nrows=5000, skipinitialspace=True
        )
        if card.kind == "classification" and card.target in df:
            df = df.groupby(df[card.target].astype(str), sort=False).head(1)
        return [
            [
                None
                if pd.isna(r[f.name])
                else float(r[f.name])
                if f.type == "numeric"
                else str(r[f.name]).strip()
                for f in card.features
            ]
            for _, r in df.head(n).iterrows()
        ]
    except (OSError, KeyError, ValueError, pd.errors.ParserError):
        return []


def image_examples(card: Card, n: int = N_EXAMPLES) -> list[str]:
    """n images of the demo data: the first of each folder (class) first, then the next ones."""
    root = Path(card.data.source)
    if not root.is_dir():
        return []
    exts, firsts, rest, folders = image_extensions(), [], [], set()
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in exts:
            (rest if p.parent in folders else firsts).append(str(p))
            folders.add(p.parent)
        if len(firsts) >= n:
            break
    return (firsts + rest)[:n]


def plots(task: str, metrics_dir: Path = Path("metrics")) -> dict:
    """The evaluation plots' data (metrics/<task>/plots, metrics/<task>/train): a confusion
    table, a PR curve, training curves; what is missing is left out."""
    out, folder = {}, metrics_dir / task
    confusion = folder / "plots" / "confusion.json"
    if confusion.is_file():
        pairs = pd.DataFrame(json.loads(confusion.read_text()))
        out["confusion"] = (
            pd.crosstab(pairs["actual"], pairs["predicted"])
            .reset_index()
            .rename(columns={"actual": "actual \\ predicted"})
        )
    importance = folder / "plots" / "importance.json"  # tabular: stages/tabular/explain.py
    if importance.is_file():
        out["importance"] = pd.DataFrame(json.loads(importance.read_text()))[["column", "drop"]]
    pr = folder / "plots" / "pr.json"
    if pr.is_file():
        out["pr"] = pd.DataFrame(json.loads(pr.read_text()))[["recall", "precision"]]
    curves = sorted((folder / "train" / "plots" / "metrics").glob("*loss.tsv"))
    if curves:
        out["curves"] = pd.concat(
            [
                pd.read_csv(c, sep="\t").set_axis(["step", "value"], axis=1).assign(series=c.stem)
                for c in curves
            ]
        )
    return out


def card_markdown(task: str, c: Card) -> str:
    test = c.metrics.get("test", {})
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k in HEADLINE)
    warned = "".join(
        f"\n> **Warning:** {w if isinstance(w, str) else json.dumps(w)}\n"
        for w in c.metrics.get("warnings") or []
    )
    return (
        f"### {task} ({c.kind})\n{warned}\n- **test metrics**: {metrics}\n"
        + served_markdown(c.ensemble, c.metrics)
        + f"- **validation**: {'passed' if c.validation.success else 'FAILED'} "
        f"(`{c.validation.suite_file}`)\n- **model md5**: `{c.provenance.get('model_md5', '?')}`\n"
        f"- **data**: `{c.data.source}` ({c.data.rows})\n"
        f"- **parity (ONNX vs training framework)**: `{json.dumps(c.parity)}`\n"
        f"- **params**: `{json.dumps(c.params)[:600]}`\n"
    )


def served_markdown(ensemble: dict | None, metrics: dict) -> str:
    """The served members (tabular: network and gradient boosting; the card's `ensemble`),
    each one's weight and test scores alone, and why those weights; "" for a model of one
    member."""
    members = metrics.get("members", {})
    if not ensemble:
        return ""
    parts = []
    for m, w in ensemble["weights"].items():
        alone = ", ".join(f"{k} {v:.4f}" for k, v in members.get(m, {}).items() if k in HEADLINE)
        parts.append(f"{m} × {w:.2f}" + (f" (alone: {alone})" if alone else ""))
    return f"- **served**: {'; '.join(parts)}. Why: {ensemble['why']}\n"


def image_input(label: str, elem_id: str):
    """gr.Image whose failed decoding is a sentence: Gradio's own preprocessing opens the
    upload with PIL first and would show PIL's message with the cache path in it. (Wrapped
    on the instance: a subclass of a Gradio component makes Gradio write a .pyi beside it.)"""
    import gradio as gr

    # image_mode=None: the file as it is (the model converts it as batch infer does).
    component = gr.Image(type="filepath", image_mode=None, label=label, elem_id=elem_id, height=220)
    preprocess = component.preprocess

    def readable(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception:  # noqa: BLE001 - PIL raises several types for "not an image"
            name = Path(getattr(payload, "orig_name", None) or "the upload").name
            raise _error(
                f"{name} is not an image that can be read (use PNG, JPEG, BMP, GIF or WebP)"
            ) from None

    component.preprocess = readable
    return component


def number_or_choice(f: dict, label: str, value):
    import gradio as gr

    if f.type == "numeric":
        return gr.Number(value=value, label=label, elem_id=f"tab-{f.name}")
    if f.type in ("text", "datetime"):  # free strings: the preprocessor reads dates
        return gr.Textbox(label=label, elem_id=f"tab-{f.name}")
    return gr.Dropdown(f.categories, value=value, label=label, elem_id=f"tab-{f.name}")


def tabular_tab(m: Loaded, cfg: Settings) -> None:
    import gradio as gr

    gr.Markdown(
        "Each field starts at the training median (numbers) or most common value; "
        "its label shows the range seen in training. Empty = missing (imputed)."
    )
    with gr.Row():
        inputs = [
            number_or_choice(f, label, value)
            for f, (label, value) in zip(m.card.features, form_defaults(m.card), strict=False)
        ]
    go = gr.Button("Predict", variant="primary", elem_id="tab-predict")
    with gr.Row():
        out = (
            gr.Label(label="prediction", elem_id="tab-out")
            if m.card.kind == "classification"
            else gr.Number(label=f"predicted {m.card.target}", elem_id="tab-out")
        )
        note = gr.Markdown(elem_id="tab-warnings")
    go.click(lambda *v: tabular_form(m, *v), inputs, [out, note], api_name="tabular_form")
    if m.card.explain:
        why = gr.BarPlot(**bars("column", "contribution", WHY, "tab-why"))
        go.click(lambda *v: tabular_why(m, *v), inputs, why, api_name="tabular_explain")
    examples = tabular_examples(m.card)
    if examples:
        gr.Examples(
            examples,
            inputs,
            label=f"Examples from {m.card.data.source}",
            elem_id="tab-examples",
        )
    gr.Markdown("Or upload a CSV with the feature columns:")
    csv_in = gr.File(file_types=[".csv"], label="CSV", elem_id="tab-csv")
    csv_out = gr.File(label="predictions")
    csv_in.upload(
        lambda p: tabular_csv(m, p, cfg.max_rows), csv_in, csv_out, api_name="tabular_csv"
    )


def image_tab(m: Loaded, cfg: Settings) -> None:
    import gradio as gr

    k, max_pixels = cfg.top_k, cfg.max_pixels
    with gr.Row():
        img = image_input("image", "img-in")
        with gr.Column():
            label = gr.Label(num_top_classes=k, label="top classes", elem_id="img-out")
            img_note = gr.Markdown(elem_id="img-warnings")

    def classify(p):
        return image_one(m, p, k, max_pixels)

    img.upload(classify, img, [label, img_note], api_name="image_one")
    if not no_cam(m.card):
        why = gr.Image(label=HEAT, elem_id="img-why", type="pil", height=240)
        img.upload(lambda p: image_why(m, p, max_pixels), img, why, api_name="image_explain")
    examples = image_examples(m.card)
    if examples:
        gr.Examples(
            examples,
            img,
            [label, img_note],
            classify,
            run_on_click=True,
            cache_examples=False,
            label="Examples from the demo data",
            elem_id="img-examples",
        )
    gr.Markdown("Or a zip of images:")
    zip_in = gr.File(file_types=[".zip"], label="zip", elem_id="img-zip")
    zip_out = gr.File(label="predictions")
    zip_in.upload(lambda p: image_zip(m, p, k, max_pixels), zip_in, zip_out, api_name="image_zip")


def detect_tab(m: Loaded, cfg: Settings) -> None:
    import gradio as gr

    with gr.Row():
        det_in = image_input("image", "det-in")
        det_img = gr.Image(type="pil", label="detections", elem_id="det-img", height=220)
    post = m.card.postprocessing  # the thresholds export checked parity at
    conf = gr.Slider(0, 1, value=post["conf"], step=0.01, label="confidence", elem_id="det-conf")
    iou = gr.Slider(0, 1, value=post["iou"], step=0.01, label="NMS IoU", elem_id="det-iou")
    det_note = gr.Markdown(elem_id="det-warnings")
    table = gr.Dataframe(
        pd.DataFrame(columns=DETECT_COLUMNS),
        headers=DETECT_COLUMNS,
        label="objects",
        elem_id="det-table",
    )
    run = gr.Button("Detect", variant="primary", elem_id="det-run")

    def detect(p, c, i):
        return detect_one(m, p, c, i, cfg.max_pixels)

    outputs = [det_img, table, det_note]
    det_in.upload(detect, [det_in, conf, iou], outputs, api_name=False)
    run.click(detect, [det_in, conf, iou], outputs, api_name="detect_one")
    examples = image_examples(m.card)
    if examples:
        gr.Examples(
            [[p, post["conf"], post["iou"]] for p in examples],
            [det_in, conf, iou],
            outputs,
            detect,
            run_on_click=True,
            cache_examples=False,
            label="Examples from the demo data",
            elem_id="det-examples",
        )


def models_tab(models: dict[str, Loaded], missing: dict[str, str]) -> None:
    import gradio as gr

    for task, m in models.items():
        gr.Markdown(card_markdown(task, m.card))
        show_label_issues(gr, task, m.card)
        data = plots(task)
        with gr.Row():
            if "confusion" in data:
                gr.Dataframe(
                    data["confusion"],
                    label=f"{task}: confusion matrix (test split)",
                    elem_id=f"models-{task}-confusion",
                    min_width=420,
                )
            if "pr" in data:
                gr.LinePlot(
                    data["pr"],
                    x="recall",
                    y="precision",
                    label=f"{task}: precision-recall (test)",
                    elem_id=f"models-{task}-pr",
                    height=240,
                )
            if "importance" in data:
                label = f"{task}: column importance (test score drop when shuffled)"
                gr.BarPlot(data["importance"], **bars("column", "drop", label, "models-importance"))
            if "curves" in data:
                gr.LinePlot(
                    data["curves"],
                    x="step",
                    y="value",
                    color="series",
                    label=f"{task}: training curves",
                    elem_id=f"models-{task}-curves",
                    height=240,
                )
    for task, why in missing.items():
        gr.Markdown(f"### {task}\n\nNot loaded: {why}\n")


def build_ui(models: dict[str, Loaded], missing: dict[str, str], cfg: Settings):
    import gradio as gr

    age = cfg.gradio_cache_s
    # delete_cache: every `age` s, uploads and outputs older than `age` s are deleted.
    with gr.Blocks(title="model-train", analytics_enabled=False, delete_cache=(age, age)) as demo:
        gr.Markdown(
            "# model-train\nPredictions from the exported ONNX models. REST API: [/docs](/docs)."
        )
        for name, task, tab in (
            ("Tabular", "tabular", tabular_tab),
            ("Image", "image", image_tab),
            ("Detection", "detect", detect_tab),
        ):
            with gr.Tab(name):
                if task in models:
                    tab(Current(models, task), cfg)
                else:
                    gr.Markdown(f"**No {task} model.** {missing[task]}")
        with gr.Tab("Models"):
            models_tab(models, missing)
    # Gradio's queue runs at most as many handlers at once as the shared model limit has
    # slots; the limit itself (app.predict.Limiter) is what REST and UI share.
    demo.queue(default_concurrency_limit=cfg.concurrency)
    return demo
