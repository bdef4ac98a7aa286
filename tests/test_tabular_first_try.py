"""A 30-row CSV with a date and a free-text column, only source and target set: the
pipeline runs, reports K-fold CV beside the test metrics, serving's fast path answers as
batch infer does, and dropping a column revalidates without --new-suite."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import run_python, set_params, stage

WORDS = ["quiet", "sunny", "flat", "near", "park", "busy", "road", "old", "new", "garden"]


def table(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    size = rng.uniform(30, 150, n).round(1)
    return pd.DataFrame(
        {
            "listed": pd.date_range("2021-01-03", periods=n, freq="9D").strftime("%Y-%m-%d"),
            "notes": [" ".join(rng.choice(WORDS, 4)) + f" {i}" for i in range(n)],
            "size": size,
            "rooms": rng.integers(1, 5, n),
            "price": (size * 3000 + rng.normal(0, 20000, n)).round(0),
        }
    )


@pytest.mark.slow
def test_thirty_rows_with_dates_and_text_first_try(repo):
    table().to_csv(repo / "data/tabular/homes.csv", index=False)
    set_params(
        repo, {"tabular.data.source": "data/tabular/homes.csv", "tabular.data.target": "price"}
    )
    for name in ("prepare", "validate", "train", "boost", "evaluate", "export", "infer"):
        stage(repo, name)
    metrics = json.loads((repo / "metrics/tabular/metrics.json").read_text())
    assert metrics["task"] == "regression"
    assert metrics["columns"] == {
        "listed": "datetime",
        "notes": "text",
        "size": "numeric",
        "rooms": "numeric",
        "price": "numeric",
    }
    assert "test" in metrics and metrics["cv"]["folds"] == 5
    assert set(metrics["cv"]["r2"]) == {"mean", "sd"}
    card = json.loads((repo / "models/tabular/model.json").read_text())
    assert card["preprocessing"]["dates"] == {"listed": "%Y-%m-%d"}
    assert len(card["preprocessing"]["texts"]["notes"]["components"]) > 0

    # Serving: the app's fast path (JSON rows) and its pandas path against batch infer.
    out = run_python(
        repo,
        """
import json, math
import numpy as np, pandas as pd
from stages.core.inference import open_session, run_batches
from stages.tabular.data import read_split
from stages.tabular.infer import predict
from stages.tabular.serving import Rows
from stages.core.card import read_card
card = read_card("models/tabular/model.json")
test = read_split("data/prepared/tabular/test.parquet").drop(columns=["price"])
rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in test.to_dict("records")]
session = open_session("models/tabular/model.onnx")
rows_fast = Rows(card)
x = rows_fast.transform(rows)
fast = [r["prediction"] for r in rows_fast.decode(run_batches(session, x, 4096))]
slow = predict(card, session, test)["prediction"].tolist()
batch = pd.read_csv("data/predictions/tabular.csv")["prediction"].tolist()
print(json.dumps({"fast": fast, "slow": slow, "batch": batch}))
""",
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["fast"] == got["slow"]  # bit for bit
    np.testing.assert_allclose(got["batch"], got["slow"], rtol=1e-6)  # the CSV keeps float32

    # A column dropped after the first run: validate rebuilds only its expectations.
    suite_file = repo / "data/expectations/tabular/homes.json"
    set_params(repo, {"tabular.data.roles": {"rooms": "drop"}})
    stage(repo, "prepare")
    res = stage(repo, "validate")
    assert "dropped 'rooms'" in res.stderr + res.stdout
    suite = json.loads(suite_file.read_text())
    assert not [e for e in suite["expectations"] if e["kwargs"].get("column") == "rooms"]
    assert math.isfinite(metrics["cv"]["r2"]["mean"])
