"""Bench section `ensemble`: what serving the network and gradient boosting together costs a
row (issue 39): a one-row request answered in process by the app (app.predict: JSON row →
features → onnxruntime → decoded answer, with the server's session options) with the one
merged graph that export writes against the network's graph alone; and the bare batch-1
session.run of the merged graph against the network's, and against the two graphs run one
after the other with the mix in numpy (the alternative: a card naming both graphs).

It reads the repository's trained tabular members (models/tabular/model.pt, boosting.joblib,
ensemble.json, after `make run`) and builds the three graphs in the scratch folder. The
served weights are used when both members have one; otherwise 0.5 each, so that the
boosting branch is in the graph whatever `make run` chose.

Target (issue 39): a served row's p50 at most 1.5x the network alone's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.bench.timing import Row, alternate, percentile


def build(scratch: Path):
    """(served Python model, {name: graph path}, test rows, weights)."""
    import onnx
    import torch

    from stages.core import layout
    from stages.core.onnx_export import WithFeatures, export_onnx
    from stages.tabular.boost import load_served
    from stages.tabular.data import split_chunks
    from stages.tabular.graph import boosting_graph, merge

    served = load_served()
    df = next(split_chunks(layout.prepared("tabular") / "test.parquet", 256))
    x = served.pre.transform(df)
    paths = {k: scratch / f"{k}.onnx" for k in ("network", "boosting", "one graph")}
    export_onnx(
        WithFeatures(served.model).eval(),
        torch.from_numpy(x[:2]),
        paths["network"],
        ("output", "features"),
    )
    net = onnx.load(str(paths["network"]))
    opset = next(o.version for o in net.opset_import if o.domain in ("", "ai.onnx"))
    onnx.save(boosting_graph(served.boosting, served.pre.n_features, opset), str(paths["boosting"]))
    w = served.ensemble["weights"]
    weights = w if min(w.values()) > 0 else {"network": 0.5, "boosting": 0.5}
    width = len(served.schema.classes) if served.classify else 1
    merged = merge(
        net, served.boosting, weights, None, served.classify, served.pre.n_features, width
    )
    onnx.save(merged, str(paths["one graph"]))
    return served, paths, x, weights


def ensemble(quick: bool, scratch: Path) -> dict:
    import dataclasses
    import json

    import pandas as pd

    from app.predict import predict_tabular
    from app.repository import load_models
    from app.settings import load_settings
    from stages.core.inference import open_session, physical_cores, softmax

    served, paths, x, weights = build(scratch)
    cfg = load_settings()
    tab = load_models("models", cfg)[0]["tabular"]  # the server's loader, its session options
    threads = max(1, physical_cores() // cfg.workers)
    sessions = {k: open_session(p, threads=threads, spinning=False) for k, p in paths.items()}
    apps = {k: dataclasses.replace(tab, session=sessions[k]) for k in ("network", "one graph")}
    request = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns=tab.card.target)
        .head(1)
        .to_json(orient="records")
    )
    row = x[:1]

    def two_graphs():
        logits = sessions["network"].run(None, {"input": row})[0]
        boosted = sessions["boosting"].run(None, {"input": row})[-1]
        if served.classify:
            mixed = weights["network"] * softmax(logits) + weights["boosting"] * boosted
            return np.log(np.maximum(mixed, 1e-12))
        return weights["network"] * logits + weights["boosting"] * boosted

    contenders = {
        "app, network alone": lambda: predict_tabular(apps["network"], request),
        "app, one graph": lambda: predict_tabular(apps["one graph"], request),
        "network alone": lambda: sessions["network"].run(None, {"input": row}),
        "one graph": lambda: sessions["one graph"].run(None, {"input": row}),
        "two graphs": two_graphs,
    }
    # One call per sample, interleaved, as the serving section times requests.
    times = alternate(contenders, 20 if quick else 500, warmup=10)
    p50 = {k: percentile(v, 50) * 1e3 for k, v in times.items()}
    ratio = p50["app, one graph"] / p50["app, network alone"]
    rows = [
        Row(
            "tabular served row p50 (app.predict, one row): one graph vs the network alone",
            ("one graph", p50["app, one graph"], "ms"),
            ("network alone", p50["app, network alone"], "ms"),
            ratio,
            "<= 1.5x",
            None if quick else ratio <= 1.5,
        ),
        Row(
            "  session.run alone (batch 1): one graph vs the network alone",
            ("one graph", p50["one graph"], "ms"),
            ("network alone", p50["network alone"], "ms"),
            p50["one graph"] / p50["network alone"],
        ),
        Row(
            "  one graph vs two graphs (+ the mix in numpy)",
            ("one graph", p50["one graph"], "ms"),
            ("two graphs", p50["two graphs"], "ms"),
            p50["one graph"] / p50["two graphs"],
        ),
    ]
    iterations = served.boosting.n_iter_ if served.boosting is not None else 0
    notes = [
        f"weights {weights}; boosting: {iterations} iterations, "
        f"{served.boosting.n_trees_per_iteration_ if served.boosting is not None else 0} trees each; "
        f"graph sizes (KB): "
        + ", ".join(f"{k} {p.stat().st_size // 1024}" for k, p in paths.items())
    ]
    return {"rows": rows, "notes": notes, "details": {"p50_ms": p50, "weights": weights}}
