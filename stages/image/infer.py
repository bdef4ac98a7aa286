"""infer: batch predictions with onnxruntime, and the serving hook the app calls. Imports no torch.

    python -m stages infer image   # a folder or manifest → data/predictions/image.csv;
                                   # unreadable files get an error row

Also writes metrics/image/infer.json with its throughput.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.cli import log
from stages.core.files import atomic_path, read_json, write_json, write_timing
from stages.core.images import list_images
from stages.core.inference import open_session, run_batches, softmax
from stages.image.data import load_rgb, normalise, top_k


def predict(card: dict, session, rgb: np.ndarray) -> np.ndarray:
    """N × H × W × 3 uint8 images (load_rgb at the card's size) → N × classes probabilities.
    `infer` and the app both call this, so they answer alike."""
    spec = card["preprocessing"]
    x = normalise(rgb, spec["mean"], spec["std"])
    return softmax(run_batches(session, x, len(x)).astype("float64"))


def run(
    params: dict,
    model_dir: Path = layout.model_dir("image"),
    out: Path = layout.PREDICTIONS["image"],
) -> dict:
    """Predict every image; one that can't be read gets a row with its error, and the batch goes on."""
    p = params["image"]["infer"]
    card = read_json(model_dir / "model.json")
    table, root = list_images(p["source"], labelled=False)
    files = table["path"].tolist()
    session = open_session(model_dir / card["onnx"]["file"])
    classes, spec = card["classes"], card["preprocessing"]
    rows, start = [], time.perf_counter()
    for i in range(0, len(files), p["batch_size"]):
        good, errors = [], {}
        for name in files[i : i + p["batch_size"]]:
            try:
                good.append((name, load_rgb(root / name, spec["image_size"])))
            except Exception as e:  # noqa: BLE001 - unreadable file: report it, keep going
                errors[name] = f"{type(e).__name__}: {e}"
        # Decode file by file (to catch unreadable ones), then predict the batch at once.
        probs = (
            predict(card, session, np.stack([rgb for _, rgb in good]))
            if good
            else np.zeros((0, len(classes)))
        )
        tops = zip(probs, top_k(probs, classes, p["top_k"]), strict=True)
        ranked = dict(zip([n for n, _ in good], tops, strict=True))
        for name in files[i : i + p["batch_size"]]:
            if name in errors:
                rows.append(
                    {
                        "path": name,
                        "prediction": None,
                        "probability": None,
                        "top_k": None,
                        "error": errors[name],
                    }
                )
            else:
                prob, best = ranked[name]
                rows.append(
                    {
                        "path": name,
                        "prediction": classes[int(prob.argmax())],
                        "probability": round(float(prob.max()), 6),
                        "top_k": best,
                        "error": None,
                    }
                )
    seconds = time.perf_counter() - start
    with atomic_path(out) as tmp:
        pd.DataFrame(rows, columns=["path", "prediction", "probability", "top_k", "error"]).to_csv(
            tmp, index=False
        )
    failed = sum(r["error"] is not None for r in rows)
    stats = {"images": len(rows), "failed": failed}
    timing = {
        "seconds": round(seconds, 4),
        "images_per_s": round(len(rows) / max(seconds, 1e-9), 1),
    }
    write_json(layout.infer_stats("image"), stats)
    write_timing("infer-image", timing)
    log(
        f"predicted {len(rows) - failed} images from {p['source']} → {out} ({timing['images_per_s']} images/s)"
        + (f"; {failed} could not be read (see the error column)" if failed else "")
    )
    return {**stats, **timing}
