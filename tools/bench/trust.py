"""The bench section `trust`: what calibration, conformal sets and the OOD p-value
(stages/core/trust.py) add to a served prediction. The same loaded model is called in
process with its card's `trust` and without it (the card as before the feature), batch 1,
interleaved; the graph's extra `features` output is computed either way (it is an
intermediate the logits need anyway)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from tools.bench.timing import Row, alternate, percentile


def trust(quick: bool, scratch: Path) -> dict:
    from app.predict import load_models, predict_image, predict_tabular
    from app.server import serve_config
    from stages.core.files import read_json
    from stages.image.data import split_images

    cfg = serve_config()
    models, missing = load_models("models", cfg)
    if {"tabular", "image"} - set(models) or "trust" not in models["tabular"].card:
        raise RuntimeError(f"models with trust missing: {missing or 're-export them'}")
    tab, img = models["tabular"], models["image"]
    bare = {
        t: dataclasses.replace(m, card={k: v for k, v in m.card.items() if k != "trust"})
        for t, m in models.items()
    }
    row = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns=tab.card["target"])
        .head(1)
        .to_json(orient="records")
    )
    digit = split_images(read_json("data/prepared/image/schema.json"))[0][0].read_bytes()
    k, px = min(cfg["top_k"], len(img.card["classes"])), cfg["max_pixels"]
    n = 20 if quick else 300
    cases = {
        "tabular": {
            "with trust": lambda: predict_tabular(tab, row),
            "without": lambda: predict_tabular(bare["tabular"], row),
        },
        "image": {
            "with trust": lambda: predict_image(img, digit, k, px),
            "without": lambda: predict_image(bare["image"], digit, k, px),
        },
    }
    rows, details = [], {"calls_per_contender": n}
    for task, contenders in cases.items():
        times = alternate(contenders, n, warmup=10)
        ms = {c: percentile(v, 50) * 1e3 for c, v in times.items()}
        details[task] = ms
        ratio = ms["with trust"] / ms["without"]
        rows.append(
            Row(
                f"{task} p50 latency, in process",
                ("with trust", ms["with trust"], "ms"),
                ("without", ms["without"], "ms"),
                ratio,
                "<= 1.10x",
                ratio <= 1.10,
            )
        )
    notes = [f"in-process app.predict calls at batch 1, {n} per contender, interleaved"]
    return {"rows": rows, "notes": notes, "details": details}
