"""infer: batch predictions with onnxruntime. Imports no torch.

    python -m stages.infer tabular   # CSV/parquet, checked by the GX suite (no target checks) → data/predictions/tabular.csv
    python -m stages.infer image     # a folder or manifest → data/predictions/image.csv; unreadable files get an error row
    python -m stages.infer detect    # a folder or manifest → data/predictions/detect.json (COCO-style results)

Each also writes metrics/<task>/infer.json with its throughput.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from stages.common import StageError, atomic_path, log, read_json, run_stage, write_json
from stages.expectations import for_inference, load_suite, run_suite, summarise
from stages.image import image_extensions, load_rgb, normalise, top_k
from stages.onnx_session import open_session, run_batches
from stages.tabular import Preprocessor, decode_outputs, read_features, softmax


def infer_tabular(params: dict, model_dir: Path = Path("models/tabular"),
                  out: Path = Path("data/predictions/tabular.csv")) -> dict:
    p = params["tabular"]["infer"]
    card = read_json(model_dir / "model.json")
    source = p["source"]
    df = read_features(source, card["features"])
    df = df.drop(columns=[card["target"]], errors="ignore")
    suite_file = card["validation"]["suite_file"]
    report = run_suite(for_inference(load_suite(suite_file)), {"input": df})
    if not report["success"]:
        # read_csv numbers rows by CSV line ("row 5" is line 5, not the fifth data row): say so.
        where = f"{source}, rows numbered by CSV line" if df.index.name == "line" else source
        raise StageError(f"{source} does not meet the expectations in {suite_file} (target checks excluded)\n"
                         + summarise(report, {"input": where}))
    session = open_session(model_dir / card["onnx"]["file"])
    start = time.perf_counter()
    x = Preprocessor.from_dict(card["preprocessing"]).transform(df, source)
    outputs = run_batches(session, x, p["batch_size"])
    table = decode_outputs(outputs, card)
    seconds = time.perf_counter() - start
    table.insert(0, "line", df.index.to_numpy())
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    stats = {"rows": len(table), "seconds": round(seconds, 4), "rows_per_s": round(len(table) / max(seconds, 1e-9))}
    write_json(Path("metrics/tabular/infer.json"), stats)
    log(f"predicted {len(table)} rows from {source} → {out} ({stats['rows_per_s']} rows/s)")
    return stats


def list_inputs(source: str | Path) -> tuple[list[str], Path]:
    """Image files under a folder (recursive, every extension PIL opens), or the `path`
    column of a CSV manifest (relative to the manifest). Returns paths and their root."""
    source = Path(source)
    if source.is_dir():
        exts = image_extensions()
        files = sorted(f.relative_to(source).as_posix() for f in source.rglob("*")
                       if f.is_file() and f.suffix.lower() in exts)
        if not files:
            raise StageError(f"{source}: no image files (searched recursively)")
        return files, source
    if source.is_file() and source.suffix.lower() == ".csv":
        import pandas as pd

        # An empty or malformed manifest was a pandas traceback, and one with only a header
        # silently predicted nothing; both are one-line errors, as in prepare's list_images.
        try:
            table = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise StageError(f"{source}: not a readable manifest ({str(e).strip()})") from None
        if "path" not in table.columns:
            raise StageError(f"{source}: a manifest needs a 'path' column")
        if table.empty:
            raise StageError(f"{source}: the manifest lists no images")
        return table["path"].tolist(), source.parent
    raise StageError(f"{source}: not found (expected an image folder or a CSV manifest with a path column)")


def infer_image(params: dict, model_dir: Path = Path("models/image"),
                out: Path = Path("data/predictions/image.csv")) -> dict:
    """Predict every image; one that can't be read gets a row with its error, and the batch goes on."""
    import pandas as pd

    p = params["image"]["infer"]
    card = read_json(model_dir / "model.json")
    files, root = list_inputs(p["source"])
    session = open_session(model_dir / card["onnx"]["file"])
    classes, spec = card["classes"], card["preprocessing"]
    rows, start = [], time.perf_counter()
    for i in range(0, len(files), p["batch_size"]):
        good, errors = [], {}
        for name in files[i:i + p["batch_size"]]:
            try:
                good.append((name, load_rgb(root / name, spec["image_size"])))
            except Exception as e:  # noqa: BLE001 - unreadable file: report it, keep going
                errors[name] = f"{type(e).__name__}: {e}"
        # preprocess() in two steps: decode file by file (to catch unreadable ones), normalise the batch at once
        x = normalise(np.stack([rgb for _, rgb in good]), spec["mean"], spec["std"]) if good else None
        probs = softmax(run_batches(session, x, len(good)).astype("float64")) if good else np.zeros((0, len(classes)))
        ranked = dict(zip([n for n, _ in good], zip(probs, top_k(probs, classes, p["top_k"]))))
        for name in files[i:i + p["batch_size"]]:
            if name in errors:
                rows.append({"path": name, "prediction": None, "probability": None, "top_k": None,
                             "error": errors[name]})
            else:
                prob, best = ranked[name]
                rows.append({"path": name, "prediction": classes[int(prob.argmax())],
                             "probability": round(float(prob.max()), 6), "top_k": best, "error": None})
    seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        pd.DataFrame(rows, columns=["path", "prediction", "probability", "top_k", "error"]).to_csv(tmp, index=False)
    failed = sum(r["error"] is not None for r in rows)
    stats = {"images": len(rows), "failed": failed, "seconds": round(seconds, 4),
             "images_per_s": round(len(rows) / max(seconds, 1e-9), 1)}
    write_json(Path("metrics/image/infer.json"), stats)
    log(f"predicted {len(rows) - failed} images from {p['source']} → {out} ({stats['images_per_s']} images/s)"
        + (f"; {failed} could not be read (see the error column)" if failed else ""))
    return stats


def infer_detect(params: dict, model_dir: Path = Path("models/detect"),
                 out: Path = Path("data/predictions/detect.json"),
                 rendered: Path = Path("data/predictions/detect_rendered")) -> dict:
    """COCO-style results ({file, category_id, category, bbox [x, y, w, h] in pixels, score})
    for every image; unreadable files are listed in metrics/detect/infer.json and skipped."""
    import json

    from stages.common import atomic_dir
    from stages.detect import decode, draw_boxes, load_for_detection

    p = params["detect"]["infer"]
    card = read_json(model_dir / "model.json")
    names, size = card["classes"], card["preprocessing"]["imgsz"]
    files, root = list_inputs(p["source"])
    session = open_session(model_dir / card["onnx"]["file"])
    name = session.get_inputs()[0].name
    results, errors, shown = [], [], []
    start = time.perf_counter()
    for i in range(0, len(files), p["batch_size"]):
        batch, metas = [], []
        for f in files[i:i + p["batch_size"]]:
            try:
                x, meta = load_for_detection(root / f, size)
            except Exception as e:  # noqa: BLE001 - unreadable file: report it, keep going
                errors.append({"file": f, "error": f"{type(e).__name__}: {e}"})
                continue
            batch.append(x)
            metas.append((f, meta))
        if not batch:
            continue
        outputs = session.run(None, {name: np.stack(batch)})[0]
        for output, (f, meta) in zip(outputs, metas):
            dets = decode(output, meta, p["conf"], p["iou"])
            if len(shown) < p["render"]:
                shown.append((f, dets))
            results += [{"file": f, "category_id": int(c), "category": names[int(c)],
                         "bbox": [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2),
                                  round(float(y2 - y1), 2)], "score": round(float(s), 5)}
                        for x1, y1, x2, y2, s, c in dets]
    seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in results) + "\n]\n")  # one detection a line
    with atomic_dir(rendered) as tmp:
        for f, dets in shown:
            draw_boxes(root / f, dets, names).save(tmp / (f.replace("/", "__").rsplit(".", 1)[0] + ".png"))
    n = len(files) - len(errors)
    stats = {"images": n, "failed": len(errors), "detections": len(results), "seconds": round(seconds, 4),
             "images_per_s": round(n / max(seconds, 1e-9), 1), "errors": errors}
    write_json(Path("metrics/detect/infer.json"), stats)
    log(f"detected {len(results)} objects in {n} images from {p['source']} → {out} ({stats['images_per_s']} images/s)"
        + (f"; {len(errors)} could not be read (see metrics/detect/infer.json)" if errors else ""))
    return stats


if __name__ == "__main__":
    run_stage({"tabular": infer_tabular, "image": infer_image, "detect": infer_detect})
