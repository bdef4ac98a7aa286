"""ONNX export (dynamic batch, parity with torch) and torch-free onnxruntime inference."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_TABULAR, card_of, copy_repo, run_python, set_params, stage

from stages.core.cli import StageError
from stages.core.inference import open_session, physical_cores, run_batches
from stages.core.onnx_export import check_parity, export_onnx
from stages.tabular.model import build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("trained"))
    set_params(repo, TINY_TABULAR)
    for name in ("prepare", "validate", "train", "boost", "evaluate", "export"):
        stage(repo, name)
    return repo


def test_export_has_a_dynamic_batch_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        {"name": "mlp", "n_in": 6, "hidden": [8], "n_out": 3, "dropout": 0.5}
    ).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 6), path)
    session = open_session(path, threads=1)
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7, 64):
        x = np.random.default_rng(n).normal(size=(n, 6)).astype(np.float32)
        got = run_batches(session, x, batch_size=n)
        np.testing.assert_allclose(got, model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)
    x = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    assert check_parity(model, path, x, atol=1e-4, classify=True)["class_agreement"] == 1.0


def test_parity_check_fails_on_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = build_model(
        {"name": "mlp", "n_in": 4, "hidden": [8], "n_out": 2, "dropout": 0.0}
    ).eval()
    export_onnx(model, torch.randn(2, 4), tmp_path / "m.onnx")
    other = build_model(
        {"name": "mlp", "n_in": 4, "hidden": [8], "n_out": 2, "dropout": 0.0}
    ).eval()
    with pytest.raises(StageError, match="disagrees with torch"):
        check_parity(
            other, tmp_path / "m.onnx", np.ones((5, 4), np.float32), atol=1e-4, classify=True
        )


def test_physical_cores_is_sane():
    assert 1 <= physical_cores() <= (__import__("os").cpu_count() or 1)


def test_model_card_describes_the_model(trained):
    card = json.loads((trained / "models/tabular/model.json").read_text())
    for key in (
        "features",
        "classes",
        "preprocessing",
        "metrics",
        "params",
        "provenance",
        "validation",
        "parity",
        "ensemble",
    ):
        assert key in card, key
    # The served members (boost@tabular): both named, weights summing to 1, and why.
    assert set(card["ensemble"]["weights"]) == {"network", "boosting"} and card["ensemble"]["why"]
    assert sum(card["ensemble"]["weights"].values()) == pytest.approx(1.0)
    assert card["onnx"]["input_shape"][0] == "batch"
    island = next(f for f in card["features"] if f["name"] == "island")
    assert island["categories"] == ["Biscoe", "Dream", "Torgersen"]


def test_infer_on_a_csv_imports_no_torch(trained, tmp_path):
    rows = (
        pd.read_parquet(trained / "data/prepared/tabular/test.parquet")
        .drop(columns="species")
        .head(5)
    )
    csv = tmp_path / "new.csv"
    rows.to_csv(csv, index=False)
    out = tmp_path / "pred.csv"
    code = (
        "import sys; from pathlib import Path; from stages.core.params import load_params; "
        "from stages.core.schema import replaced; "
        "from stages.tabular.infer import run as infer_tabular; "
        f"p = replaced(load_params(), {{'tabular.infer.source': {str(csv)!r}}}); "
        f"infer_tabular(p, out=Path({str(out)!r})); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'ultralytics')); "
        "assert not bad, bad; print('ok')"
    )
    assert run_python(trained, code).stdout.strip().endswith("ok")
    preds = pd.read_csv(out)
    assert preds["line"].tolist() == [2, 3, 4, 5, 6]  # line numbers of the new CSV
    # The same rows straight through onnxruntime give the same predictions.
    from stages.core.card import read_card
    from stages.tabular.data import Preprocessor, decode_outputs

    card = read_card(trained / "models/tabular/model.json")
    x = Preprocessor.from_dict(card.preprocessing).transform(rows)
    direct = decode_outputs(
        run_batches(open_session(trained / "models/tabular/model.onnx"), x, 2), card
    )
    assert preds["prediction"].tolist() == direct["prediction"].tolist()
    np.testing.assert_allclose(preds["probability"], direct["probability"], rtol=1e-5)


def test_infer_stage_records_throughput(trained):
    stage(trained, "infer")
    stats = json.loads((trained / "metrics/tabular/infer.json").read_text())
    assert stats["rows"] == len(pd.read_csv(trained / "data/predictions/tabular.csv")) > 0
    # timings stay out of the tracked output: they differ on every run; warnings are counts
    assert set(stats) == {"rows", "warnings"} and stats["warnings"] == {}
    assert json.loads((trained / ".cache/timings/infer-tabular.json").read_text())["rows_per_s"] > 0


def test_torchscript_is_optional(trained):
    set_params(trained, {"tabular.export.torchscript": True})
    stage(trained, "export")
    ts = torch.jit.load(str(trained / "models/tabular/model.ts"))
    assert (
        ts(
            torch.zeros(
                3,
                json.loads((trained / "models/tabular/model.json").read_text())["onnx"][
                    "input_shape"
                ][1],
            )
        ).shape[0]
        == 3
    )
    set_params(trained, {"tabular.export.torchscript": False})


@pytest.mark.parametrize(
    "classes", [["Adelie", "Chinstrap", "Gentoo"], ["a,b", 'say "hi"', "plain", "new\nline"]]
)
def test_prediction_files_hold_what_was_predicted(tmp_path, classes):
    """infer's Writer, chunk after chunk: the CSV has every label (quoted only where it has
    to be) and probabilities to six decimals as `%.6f` writes them; parquet, float32 as is."""
    import csv

    from stages.tabular.data import scores, scores_table
    from stages.tabular.infer import Writer

    card = card_of(kind="classification", classes=classes)
    predicted = scores(
        np.random.default_rng(0).normal(0, 8, (5000, len(classes))).astype(np.float32), card
    )
    predicted[7] = predicted[7, 0]  # a tie: the first class, as in predict()'s table
    table = scores_table(predicted, card)
    lines = np.arange(2, 5002) * 3
    for suffix in ("csv", "parquet"):
        writer = Writer(tmp_path / f"p.{suffix}", card)
        writer.write(predicted[:3000], lines[:3000])
        writer.write(predicted[3000:], lines[3000:])
        writer.close()
    with open(tmp_path / "p.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    parquet = pd.read_parquet(tmp_path / "p.parquet")
    # every batch file has a warnings column (issue 37): empty here, nothing was unseen
    assert header == list(parquet.columns) == ["line", *table.columns, "warnings"]
    assert {r[-1] for r in rows} == {""} and set(parquet["warnings"]) == {""}
    assert [int(r[0]) for r in rows] == lines.tolist() == parquet["line"].tolist()
    assert [r[1] for r in rows] == table["prediction"].tolist() == parquet["prediction"].tolist()
    probs = table.drop(columns="prediction").to_numpy()
    assert [r[2:-1] for r in rows] == [[f"{v:.6f}" for v in row] for row in probs]
    assert np.array_equal(
        parquet.drop(columns=["line", "prediction", "warnings"]).to_numpy(),
        probs.astype(np.float32),
    )
    quoted = [*header, *table["prediction"]]  # only text with a comma, quote or newline is quoted
    assert (tmp_path / "p.csv").read_text().count('"') == 2 * sum(
        any(c in text for c in ',"\n') + text.count('"') for text in quoted
    )


def test_regression_predictions_are_written_at_float32_precision(tmp_path):
    from stages.tabular.data import scores, scores_table
    from stages.tabular.infer import Writer

    card = card_of(kind="regression", target_scaling={"mean": 1e4, "std": 3e3})
    predicted = scores(np.random.default_rng(1).normal(0, 5, (1000, 1)).astype(np.float32), card)
    table = scores_table(predicted, card)
    for suffix in ("csv", "parquet"):
        writer = Writer(tmp_path / f"r.{suffix}", card)
        writer.write(predicted, np.arange(2, 1002))
        writer.close()
    back = pd.read_csv(tmp_path / "r.csv")
    assert list(back.columns) == ["line", "prediction", "warnings"] and back[
        "line"
    ].tolist() == list(range(2, 1002))
    want = table["prediction"].to_numpy().astype(np.float32)
    assert np.array_equal(back["prediction"].to_numpy().astype(np.float32), want)
    assert np.array_equal(pd.read_parquet(tmp_path / "r.parquet")["prediction"].to_numpy(), want)
