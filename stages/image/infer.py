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
from PIL import Image

from stages.core import layout
from stages.core.card import Card, read_card
from stages.core.cli import StageError, log
from stages.core.files import atomic_dir, atomic_path, write_json, write_timing
from stages.core.images import list_images
from stages.core.inference import open_session, run_all, softmax
from stages.core.schema import Params
from stages.core.trust import ood_vectors, with_trust
from stages.image.data import load_rgb, normalise, top_k


def predict(card: Card, session, rgb: np.ndarray) -> np.ndarray:
    """N × H × W × 3 uint8 images (load_rgb at the card's size) → N × classes probabilities.
    `infer` and the app both call this, so they answer alike."""
    return predict_outputs(card, session, rgb)[0]


def predict_outputs(card: Card, session, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, the penultimate features that trust reads, or None for a card
    without trust)."""
    return predict_with_cams(card, session, rgb)[:2]


def predict_with_cams(card: Card, session, rgb: np.ndarray) -> tuple:
    """predict_outputs and the class activation maps of the predicted classes ([N, h, w];
    None for a graph without them: stages/image/cam.py)."""
    spec = card.preprocessing
    x = normalise(rgb, spec["mean"], spec["std"])
    outs = run_all(session, x, max(len(x), 1))
    cams = outs[2] if len(outs) > 2 else None
    return softmax(outs[0].astype("float64")), ood_vectors(card, x, outs), cams


def heatmap(cam: np.ndarray, width: int, height: int) -> Image.Image:
    """A class activation map as a grayscale image of the input's size: 0 = no evidence for
    the class (the map at or below 0), 255 = the most (its maximum), bilinear in between."""
    up = np.asarray(
        Image.fromarray(cam.astype(np.float32), "F").resize((width, height), Image.BILINEAR)
    )
    up = np.maximum(up, 0)
    top = up.max()
    return Image.fromarray(
        np.rint(up / top * 255).astype(np.uint8) if top > 0 else np.zeros_like(up, np.uint8), "L"
    )


def no_cam(card: Card) -> str | None:
    """Why the model has no heatmaps, or None when it has them."""
    e = card.explain or {}
    if e.get("cam"):
        return None
    return (
        e.get("why_no_cam")
        or "the model was exported before heatmaps existed: re-run `dvc repro export@image`"
    )


def write_heatmaps(cams: dict, root: Path, folder: Path) -> None:
    """Each image's map as <folder>/<its path>.png, at the image's size (read from its header);
    `..` and a leading `/` left out of the path, so that every file lands inside the folder."""
    with atomic_dir(folder) as tmp:
        for name, cam in cams.items():
            inside = [
                part for part in Path(name).parts if part not in ("..", ".", Path(name).anchor)
            ]
            target = tmp.joinpath(*inside[:-1], f"{inside[-1]}.png")
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(root / name) as im:
                heatmap(cam, im.width, im.height).save(target)


TRUST = ["prediction_set", "ood_flagged", "ood_p_value"]  # empty for a card without trust


def trust_fields(card: Card, probs: np.ndarray, feats) -> list[dict]:
    """Per image: prediction_set (a JSON list), ood_flagged, ood_p_value, as CSV columns."""
    import json

    rows = with_trust(card, [{} for _ in probs], probs, feats)
    return [
        {
            "prediction_set": json.dumps(r["prediction_set"]),
            "ood_flagged": r["ood"]["flagged"],
            "ood_p_value": r["ood"]["p_value"],
        }
        if r
        else {}
        for r in rows
    ]


def run(
    params: Params,
    model_dir: Path = layout.model_dir("image"),
    out: Path = layout.PREDICTIONS["image"],
) -> dict:
    """Predict every image; one that can't be read gets a row with its error, and the batch goes on."""
    p = params.image.infer
    card = read_card(model_dir / layout.card("image").name)
    table, root = list_images(p.source, labelled=False)
    files = table["path"].tolist()
    session = open_session(model_dir / card.onnx.file)
    classes, spec = card.classes, card.preprocessing
    if p.heatmaps and no_cam(card):
        raise StageError(f"image.infer.heatmaps: {no_cam(card)}")
    rows, start, cams = [], time.perf_counter(), {}
    for i in range(0, len(files), p.batch_size):
        good, errors = [], {}
        for name in files[i : i + p.batch_size]:
            try:
                good.append((name, load_rgb(root / name, spec["image_size"])))
            except Exception as e:  # noqa: BLE001 - unreadable file: report it, keep going
                errors[name] = f"{type(e).__name__}: {e}"
        # Decode file by file (to catch unreadable ones), then predict the batch at once.
        probs, feats, maps = (
            predict_with_cams(card, session, np.stack([rgb for _, rgb in good]))
            if good
            else (np.zeros((0, len(classes))), None, None)
        )
        if p.heatmaps and maps is not None:
            cams.update(zip([n for n, _ in good], maps, strict=True))
        trusted = trust_fields(card, probs, feats)
        tops = zip(probs, top_k(probs, classes, p.top_k), trusted, strict=True)
        ranked = dict(zip([n for n, _ in good], tops, strict=True))
        for name in files[i : i + p.batch_size]:
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
                prob, best, extra = ranked[name]
                rows.append(
                    {
                        "path": name,
                        "prediction": classes[int(prob.argmax())],
                        "probability": round(float(prob.max()), 6),
                        "top_k": best,
                        "error": None,
                        **extra,
                    }
                )
    seconds = time.perf_counter() - start
    if p.heatmaps:
        write_heatmaps(cams, root, layout.HEATMAPS)
    with atomic_path(out) as tmp:
        pd.DataFrame(
            rows, columns=["path", "prediction", "probability", "top_k", "error", *TRUST]
        ).to_csv(tmp, index=False)
    failed = sum(r["error"] is not None for r in rows)
    stats = {"images": len(rows), "failed": failed}
    timing = {
        "seconds": round(seconds, 4),
        "images_per_s": round(len(rows) / max(seconds, 1e-9), 1),
    }
    write_json(layout.infer_stats("image"), stats)
    write_timing("infer-image", timing)
    log(
        f"predicted {len(rows) - failed} images from {p.source} → {out} ({timing['images_per_s']} images/s)"
        + (f"; {failed} could not be read (see the error column)" if failed else "")
    )
    return {**stats, **timing}
