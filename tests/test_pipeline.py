"""End to end: `dvc repro` of the tabular stages in a fresh copy of the repo (targets
limit each run to the tabular chain; the other tasks have their own end-to-end tests)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import run, set_params

pytestmark = pytest.mark.slow

METRICS = [
    "metrics/tabular/metrics.json",
    "metrics/tabular/train/metrics.json",
    "metrics/tabular/validation.json",
    "metrics/tabular/plots/confusion.json",
    "metrics/tabular/plots/roc.json",
]


def read(repo, rel):
    return json.loads((repo / rel).read_text())


def test_repro_runs_every_stage_and_is_reproducible(repo):
    # Without a lock, as in a repo whose pipeline never ran: every stage must run. (With the
    # committed lock, validate@tabular is rightly skipped: its only output, validation.json,
    # is committed, and prepare writes the data it read, bit for bit.)
    (repo / "dvc.lock").unlink()
    out = run(repo, "dvc", "repro", "infer@tabular")
    for name in ("prepare", "validate", "train", "boost", "evaluate", "export", "infer"):
        assert f"Running stage '{name}@tabular'" in out.stdout
    for rel in (
        "data/prepared/tabular/train.parquet",
        "data/prepared/tabular/columns.json",
        "models/tabular/model.pt",
        "models/tabular/model.onnx",
        "models/tabular/model.json",
        "data/predictions/tabular.csv",
        "metrics/tabular/infer.json",
        "metrics/tabular/datadocs/index.html",
        "metrics/tabular/train/plots/metrics/val_loss.tsv",
        *METRICS,
    ):
        assert (repo / rel).exists(), rel

    card = read(repo, "models/tabular/model.json")
    assert card["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
    assert {f["name"] for f in card["features"]} >= {"island", "bill_length_mm", "sex"}
    assert card["parity"]["max_abs_diff"] <= 1e-4 and card["validation"]["success"]
    assert (
        card["metrics"]["test"]["accuracy"] > 0.8
    )  # 10 tiny epochs; the default params reach >= 0.97
    assert card["params"]["tabular.train"]["epochs"] == 10
    # Provenance from dvc.lock, not from the (never clean during repro) git tree.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train@tabular"]
    assert card["provenance"]["deps"] == {d["path"]: d["md5"] for d in lock["deps"]}
    assert card["provenance"]["model_md5"] == next(
        o["md5"] for o in lock["outs"] if o["path"] == "models/tabular/model.pt"
    )
    preds = pd.read_csv(repo / "data/predictions/tabular.csv")
    assert len(preds) == card["data"]["rows"]["test"]
    assert set(preds["prediction"]) <= set(card["classes"])
    assert (preds[["p_Adelie", "p_Chinstrap", "p_Gentoo"]].sum(axis=1) - 1).abs().max() < 1e-4
    assert (
        len((repo / "metrics/tabular/train/plots/metrics/val_loss.tsv").read_text().splitlines())
        == 1 + 10
    )

    assert "Data and pipelines are up to date" in run(repo, "dvc", "status", "infer@tabular").stdout
    assert "didn't change, skipping" in run(repo, "dvc", "repro", "infer@tabular").stdout
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "metrics/tabular/metrics.json" in json.dumps(shown)

    # Same params, same data, CPU: the same numbers, to the bit.
    before = {rel: (repo / rel).read_bytes() for rel in METRICS}
    run(repo, "dvc", "repro", "--force", "infer@tabular")
    assert {rel: (repo / rel).read_bytes() for rel in METRICS} == before


def test_another_classification_csv_by_editing_only_data_params(repo):
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True).frame
    wine["target"] = wine["target"].map({0: "barolo", 1: "grignolino", 2: "barbera"})
    wine.to_csv(repo / "data/tabular/wine.csv", sep=";", index=False)  # a different delimiter, too
    set_params(
        repo,
        {
            "tabular.data.source": "data/tabular/wine.csv",
            "tabular.data.target": "target",
            "tabular.infer.source": "data/prepared/tabular/test.parquet",
        },
    )
    run(repo, "dvc", "repro", "infer@tabular")
    assert (repo / "data/expectations/tabular/wine.json").exists()  # a suite made for this data
    card = read(repo, "models/tabular/model.json")
    assert (
        card["classes"] == ["barbera", "barolo", "grignolino"] and card["kind"] == "classification"
    )
    assert read(repo, "metrics/tabular/metrics.json")["test"]["accuracy"] > 0.8


def test_a_regression_csv_by_editing_only_data_params(repo):
    from sklearn.datasets import load_diabetes

    load_diabetes(as_frame=True, scaled=False).frame.to_csv(
        repo / "data/tabular/diabetes.csv", index=False
    )
    set_params(
        repo,
        {
            "tabular.data.source": "data/tabular/diabetes.csv",
            "tabular.data.target": "target",
            "tabular.data.task": "regression",
            "tabular.train.epochs": 30,
        },
    )
    run(repo, "dvc", "repro", "infer@tabular")
    metrics = read(repo, "metrics/tabular/metrics.json")
    trust = {"coverage", "mean_interval_width", "ood_flagged_share", "ood_p_le_0.1", "ood_p_le_0.5"}
    assert set(metrics["test"]) == {"rmse", "mae", "r2", *trust} and set(
        metrics["baseline_hgb"]
    ) == {
        "rmse",
        "mae",
        "r2",
    }
    assert metrics["test"]["r2"] > 0.2
    preds = pd.read_csv(repo / "data/predictions/tabular.csv")
    assert (
        list(preds.columns)
        == [
            "line",
            "prediction",
            "interval_low",
            "interval_high",
            "ood_flagged",
            "ood_p_value",
            "warnings",
        ]
        and preds["prediction"].between(0, 500).all()
    )
    assert (
        metrics["test"]["coverage"] >= 0.8
    )  # conformal intervals at alpha 0.1 (stages/core/trust.py)
    assert (preds["interval_low"] < preds["prediction"]).all()
    assert read(repo, "models/tabular/model.json")["parity"]["max_abs_diff"] <= 1e-4
