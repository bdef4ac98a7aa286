"""The bench section `trust`: what calibration, conformal sets and the OOD p-value
(stages/core/trust.py) add to a served prediction. Two servers over the same ONNX files,
one with the cards' `trust` and one with it removed (as a card from before the feature),
get the same requests, interleaved; the target is on the REST p50 (/predict rises <= 10%).
The in-process call (app.predict) is shown beside it without a target: there the few
microseconds of numpy are a larger share. The graph's extra `features` output is computed
either way (the logits need it anyway)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from stages.core import layout
from stages.core.card import read_card, write_card
from tools.bench.timing import Row, alternate, percentile


def bare_models(dst: Path) -> Path:
    """models/tabular and models/image copied to dst, their cards without `trust`."""
    for task in ("tabular", "image"):
        (dst / task).mkdir(parents=True)
        card = read_card(layout.card(task))
        if card.trust is None:
            raise RuntimeError(f"{layout.card(task)} has no trust: re-export it")
        shutil.copy(f"models/{task}/{card.onnx.file}", dst / task)
        write_card(dst / task / layout.CARD_FILE, card.model_copy(update={"trust": None}))
    return dst


def trust(quick: bool, scratch: Path) -> dict:
    import httpx

    from app.settings import load_settings
    from stages.core.files import read_json
    from stages.image.data import split_images
    from tools.bench.serving import start_server

    cfg = load_settings()
    row = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns=read_json(layout.card("tabular"))["target"])
        .head(1)
        .to_json(orient="records")
    )
    digit = split_images(read_json(layout.columns("image")))[0][0].read_bytes()
    n = 20 if quick else 300
    procs, clients = [], {}
    try:
        for name, models in (("with trust", None), ("without", bare_models(scratch / "bare"))):
            (scratch / name).mkdir()
            old = os.environ.get("APP_MODELS_DIR")
            if models is not None:
                os.environ["APP_MODELS_DIR"] = str(models)
            try:
                proc, url = start_server(scratch / name)
            finally:
                if old is None:
                    os.environ.pop("APP_MODELS_DIR", None)
                else:
                    os.environ["APP_MODELS_DIR"] = old
            procs.append(proc)
            clients[name] = httpx.Client(base_url=url, timeout=30)

        def tabular(c):
            return lambda: c.post("/predict/tabular", json={"rows": row}).raise_for_status()

        def image(c):
            k = cfg.top_k
            files = {"file": ("digit.png", digit, "image/png")}
            return lambda: c.post(f"/predict/image?top_k={k}", files=files).raise_for_status()

        answer = clients["with trust"].post("/predict/tabular", json={"rows": row}).json()
        rows, details = [], {"requests_per_contender": n, "tabular_answer": answer}
        for task, call in (("tabular", tabular), ("image", image)):
            times = alternate({c: call(client) for c, client in clients.items()}, n, warmup=10)
            ms = {c: percentile(v, 50) * 1e3 for c, v in times.items()}
            details[task] = ms
            ratio = ms["with trust"] / ms["without"]
            rows.append(
                Row(
                    f"{task} /predict p50",
                    ("with trust", ms["with trust"], "ms"),
                    ("without", ms["without"], "ms"),
                    ratio,
                    "<= 1.10x",
                    ratio <= 1.10,
                )
            )
    finally:
        for c in clients.values():
            c.close()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    notes = [
        f"two servers (cards with and without trust, same ONNX files), {n} sequential requests "
        "each over one keep-alive connection, interleaved"
    ]
    return {"rows": rows, "notes": notes, "details": details}
