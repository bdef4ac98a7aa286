"""The bench section `explain`: what explaining a tabular row adds to its answer
(stages/tabular/explain.py). The served call, app.predict.predict_tabular on one JSON row,
with explain on and off, interleaved, in-process: targets on the added p50, at most 10 ms
for 20 columns and at most 50 ms for 60 (issue 40). The 20- and 60-column models are the
project's MLP at the default width (tabular.train.hidden [128, 128]), untrained (the cost does not
depend on the weights), exported as export does, with a card like export's: 20 columns are
sampled (more than exact_columns), and so are 60. The trained penguins model (7 columns)
is measured beside them when models/tabular has an explanation background."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.core import layout
from tools.bench.timing import Row, alternate, percentile

HIDDEN = [128, 128]  # tabular.train.hidden's default
TARGETS_MS = {20: 10.0, 60: 50.0}


def wide_model(columns: int, folder: Path, export) -> Path:
    """models/tabular-like folder: an untrained MLP on `columns` numbers, and its card."""
    import torch

    from stages.core.onnx_export import export_onnx
    from stages.tabular.model import MLP

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = MLP(columns, HIDDEN, 3, 0.0).eval()
    export_onnx(model, torch.zeros(2, columns), folder / layout.MODEL_ONNX_FILE)
    names = [f"c{i}" for i in range(columns)]
    rng = np.random.default_rng(0)
    card = {
        "task": "tabular",
        "kind": "classification",
        "classes": ["a", "b", "c"],
        "onnx": {
            "file": layout.MODEL_ONNX_FILE,
            "sha256": "",
            "input": "input",
            "output": "output",
            "input_shape": ["batch", columns],
        },
        "features": [{"name": n, "type": "numeric"} for n in names],
        "preprocessing": {
            "numeric": names,
            "categorical": [],
            "medians": [0.0] * columns,
            "means": [0.0] * columns,
            "stds": [1.0] * columns,
            "categories": {},
        },
        "explain": {
            "columns": names,
            "exact_columns": export.exact_columns,
            "permutations": export.permutations,
            "seed": 0,
            "background": rng.normal(size=(export.background_rows, columns)).tolist(),
        },
    }
    (folder / layout.CARD_FILE).write_text(json.dumps(card))
    return folder


def served(folder: Path):
    """(Loaded, one JSON row) as the server holds them (bare: no trust, no monitor checks)."""
    from app.predict import Limiter, Loaded
    from app.settings import load_settings
    from stages.core.card import read_card
    from stages.core.inference import open_session, physical_cores
    from stages.tabular.serving import Rows

    card = read_card(folder / layout.CARD_FILE)
    cfg = load_settings()
    session = open_session(folder / card.onnx.file, threads=max(1, physical_cores() // cfg.workers))

    class Quiet:  # the monitor's checks cost the same with explain on or off
        strict = False

        def warnings(self, rows, screened=None):
            return [[] for _ in rows]

        def observe(self, rows):
            pass

        def ood(self, preds):
            pass

    m = Loaded(card, session, Quiet(), Limiter(1, 60), Rows(card), 4096)
    return m


def explain(quick: bool, scratch: Path) -> dict:
    import pandas as pd

    from app.predict import predict_tabular
    from stages.core.params import load_params

    export = load_params().tabular.export
    n = 10 if quick else 200
    rows, details = [], {}
    cases = [(c, wide_model(c, scratch / f"c{c}", export)) for c in TARGETS_MS]
    penguins = layout.model_dir("tabular")
    card = layout.card("tabular")
    if card.is_file() and "explain" in json.loads(card.read_text()):
        cases.insert(0, (None, penguins))
    for columns, folder in cases:
        m = served(folder)
        if columns is None:
            df = pd.read_parquet("data/prepared/tabular/test.parquet")
            row = json.loads(
                df[[f.name for f in m.card.features]].head(1).to_json(orient="records")
            )
        else:
            row = [
                {
                    f"c{i}": float(v)
                    for i, v in enumerate(np.random.default_rng(1).normal(size=columns))
                }
            ]
        times = alternate(
            {
                "explain": lambda m=m, row=row: predict_tabular(m, row, explain=True),
                "plain": lambda m=m, row=row: predict_tabular(m, row),
            },
            n,
            warmup=3,
        )
        ms = {k: percentile(v, 50) * 1e3 for k, v in times.items()}
        added = ms["explain"] - ms["plain"]
        m_cols = len(m.card.explain["columns"])
        how = "exact" if m_cols <= m.card.explain["exact_columns"] else "sampled"
        what = f"{'penguins, ' if columns is None else ''}{m_cols} columns ({how}): added p50"
        target = TARGETS_MS.get(columns)
        details[what] = {**ms, "added_ms": added}
        rows.append(
            Row(
                what,
                ("explain", ms["explain"], "ms"),
                ("plain", ms["plain"], "ms"),
                ms["explain"] / ms["plain"],
                f"added <= {target:g} ms" if target else "",
                added <= target if target else None,
            )
        )
    notes = [
        f"one JSON row through app.predict.predict_tabular, {n} calls each way, interleaved; "
        f"background {export.background_rows} rows, {export.permutations} permutations beyond "
        f"{export.exact_columns} columns"
    ]
    return {"rows": rows, "notes": notes, "details": details}
