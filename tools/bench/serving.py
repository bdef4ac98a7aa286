"""Benchmark section 2: the REST server under load (latency percentiles, throughput, memory)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from stages.core import layout
from stages.core.files import read_json
from tools.bench.repo import (
    ROOT,
)
from tools.bench.timing import Row, alternate, percentile


# ------------------------------------------------------------------ 2. serving
def start_server(scratch: Path) -> tuple[subprocess.Popen, str]:
    """`python -m app.server` on a free port of 127.0.0.1, as tests/conftest.py starts it."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = scratch / "server.log"  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.server"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 (the server outlives this block)
        env={**os.environ, "APP_HOST": "127.0.0.1", "APP_PORT": str(port)},
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.3)


def latency_rows(task: str, ms: dict) -> list[Row]:
    """p50 and p99 of the server vs in process, and in process vs the bare session.run."""
    rows = []
    for q in ("p50", "p99"):
        added = ms["server"][q] - ms["in-process"][q]
        rule = task == "tabular" and q == "p50"
        rows.append(
            Row(
                f"{task} {q} latency",
                ("server", ms["server"][q], "ms"),
                ("in-process", ms["in-process"][q], "ms"),
                ms["server"][q] / ms["in-process"][q],
                "server adds <= 3 ms" if rule else f"server adds {added:.2f} ms",
                added <= 3 if rule else None,
                {"added_ms": added},
            )
        )
    ratio = ms["in-process"]["p50"] / ms["session.run"]["p50"]
    # The tabular fast path (stages/tabular/serving.py): numpy, no pandas per request.
    rows.append(
        Row(
            f"{task} p50 latency",
            ("in-process", ms["in-process"]["p50"], "ms"),
            ("session.run", ms["session.run"]["p50"], "ms"),
            ratio,
            "<= 10x" if task == "tabular" else "",
            ratio <= 10 if task == "tabular" else None,
        )
    )
    return rows


def serving(quick: bool, scratch: Path) -> dict:
    """p50/p99 through the HTTP server vs the same call in process vs the bare session.run."""
    import httpx

    from app.predict import predict_image, predict_tabular
    from app.repository import load_models
    from app.settings import load_settings
    from stages.image.data import preprocess, split_images
    from stages.tabular.data import Preprocessor, type_features

    cfg = load_settings()
    models, missing = load_models("models", cfg)  # the server's own loader: same session options
    if {"tabular", "image"} - set(models):
        raise RuntimeError(f"models missing: {missing}")
    tab, img = models["tabular"], models["image"]
    row = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns=tab.card.target)
        .head(1)
        .to_json(orient="records")
    )
    x_row = Preprocessor.from_dict(tab.card.preprocessing).transform(
        type_features(pd.DataFrame(row), tab.card.features, "request")
    )
    digit = split_images(read_json(layout.columns("image")))[0][0].read_bytes()
    x_img = preprocess([io.BytesIO(digit)], img.card.preprocessing)
    k = min(cfg.top_k, len(img.card.classes))
    n = 20 if quick else 300
    rows, details = [], {"requests_per_contender": n}
    proc, url = start_server(scratch)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:  # one keep-alive connection

            def post_tabular():
                r = client.post("/predict/tabular", json={"rows": row})
                r.raise_for_status()
                return r.json()["predictions"]

            def post_image():
                r = client.post(
                    f"/predict/image?top_k={k}", files={"file": ("digit.png", digit, "image/png")}
                )
                r.raise_for_status()
                return r.json()

            same = (
                post_tabular() == predict_tabular(tab, row),
                post_image() == predict_image(img, digit, k, cfg.max_pixels),
            )
            sname, iname = tab.session.get_inputs()[0].name, img.session.get_inputs()[0].name
            cases = {
                "tabular": {
                    "server": post_tabular,
                    "in-process": lambda: predict_tabular(tab, row),
                    "session.run": lambda: tab.session.run(None, {sname: x_row}),
                },
                "image": {
                    "server": post_image,
                    "in-process": lambda: predict_image(img, digit, k, cfg.max_pixels),
                    "session.run": lambda: img.session.run(None, {iname: x_img}),
                },
            }
            for task, contenders in cases.items():
                times = alternate(contenders, n, warmup=10)
                ms = {
                    c: {"p50": percentile(v, 50) * 1e3, "p99": percentile(v, 99) * 1e3}
                    for c, v in times.items()
                }
                details[task] = ms
                rows += latency_rows(task, ms)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    notes = [
        f"sequential requests over one keep-alive httpx connection, {n} per contender, interleaved with the "
        "in-process call (app.predict) and the bare session.run on the preprocessed input",
        "server and in-process answers identical: " + ("yes" if all(same) else f"NO {same}"),
    ]
    return {"rows": rows, "notes": notes, "details": details}
