"""The real-data tier (`pytest -m real`, issue 37): public tables the other tests never use,
each with only source and target set, through the whole `dvc repro` of the tabular task
(every stage, labels included, batch infer over the raw file itself), then the served model
answers raw rows of the file over REST and over v2 (tritonclient). CI sizes (each table's
first rows, tools/realtables.py TABLES) and tiny params; `python -m tools.realtables` runs the
same at full size."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import TINY_TABULAR

from tools.realtables import TABLES, raw_rows, run_one

pytestmark = [pytest.mark.real, pytest.mark.slow]

# Tiny, and no HGB baseline or K-fold CV in evaluate: the tier checks that every stage runs
# and serves, not the scores (those are `python -m tools.realtables` at full size).
TINY = {
    **TINY_TABULAR,
    "tabular.train.epochs": 5,
    "tabular.evaluate.baseline": False,
    "tabular.evaluate.cv_below": 0,
}


@pytest.mark.parametrize("name", list(TABLES))
def test_table_first_try_every_stage_and_served(name, tmp_path):
    r = run_one(name, TABLES[name].ci_rows, TINY, keep=tmp_path)
    assert r["ok"], f"{name} stopped in {r['stopped']}:\n{r['error']}"
    csv = tmp_path / "repo" / "data" / "tabular" / f"{name}.csv"
    # Batch infer over the raw file: one prediction per row, in input order, and a warnings column.
    pred = pd.read_csv(tmp_path / "repo" / "data" / "predictions" / "tabular.csv")
    assert pred["line"].tolist() == list(range(2, 2 + len(pd.read_csv(csv))))
    assert "warnings" in pred.columns
    # The served model answers raw rows (every column of the file) over REST and v2.
    rows = raw_rows(csv)
    rest = r["served"]["rest"]["predictions"]
    assert len(rest) == len(rows) and all("warnings" in p for p in rest)
    v2 = r["served"]["v2"]
    assert len(v2["warnings"]) == len(rows)
    assert len(v2.get("label", v2.get("prediction"))) == len(rows)
    card = json.loads((tmp_path / "repo" / "models" / "tabular" / "model.json").read_text())
    assert TABLES[name].target in card["ignored"]  # the target column travels in a raw row
