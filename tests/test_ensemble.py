"""The network and gradient boosting together (stages/tabular/ensemble.py, graph.py, boost.py):
greedy selection on validation predictions, the fallbacks to one member, and the one ONNX
graph that serves both, checked against the Python models under real onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_TABULAR, copy_repo, set_params, stage

from stages.core.inference import open_session, run_all
from stages.core.onnx_export import WithFeatures, export_onnx, predict
from stages.tabular.ensemble import (
    chosen,
    combine,
    fit_boosting,
    member_outputs,
    select,
    val_problem,
)
from stages.tabular.graph import boosting_graph, merge
from stages.tabular.model import build_model

ONNX = {"file": "model.onnx", "sha256": "", "input": "input", "output": "output", "input_shape": []}
BOOST = SimpleNamespace(learning_rate=0.1, max_iter=30, max_leaf_nodes=8, patience=5)


def test_selection_mixes_members_that_help_each_other_and_drops_one_that_does_not():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    truth = np.eye(2)[y]
    # Two members right 75% of the time on different rows: their mean beats either.
    a = np.where(rng.random((400, 1)) < 0.75, 0.8 * truth + 0.1, 0.9 - 0.8 * truth)
    b = np.where(rng.random((400, 1)) < 0.75, 0.8 * truth + 0.1, 0.9 - 0.8 * truth)
    picked = select({"network": a, "boosting": b}, y, True, rounds=20)
    assert sum(picked["weights"].values()) == pytest.approx(1.0)
    assert 0.2 < picked["weights"]["network"] < 0.8
    assert picked["val_loss_ensemble"] < min(picked["val_loss"].values())
    wrong = 0.9 - 0.8 * truth  # confidently wrong on every row
    alone = select({"network": a, "boosting": wrong}, y, True, rounds=20)
    assert alone["weights"] == {"network": 1.0, "boosting": 0.0}
    # Regression: mean squared error; the same member twice ties, and ties go to the network.
    v = rng.normal(size=400)
    same = select({"network": v, "boosting": v.copy()}, v + 0.1, False, rounds=10)
    assert same["weights"] == {"network": 1.0, "boosting": 0.0}


@pytest.mark.parametrize(
    "y, classify, why",
    [
        (np.arange(5) % 2, True, "5 validation rows (fewer than 20)"),
        (np.zeros(40, int), True, "the validation split holds a single class"),
        (np.full(40, 3.0), False, "the target is constant on the validation split"),
    ],
)
def test_a_validation_split_that_cannot_judge_falls_back_to_the_network(y, classify, why):
    assert val_problem(y, classify) == why
    preds = {"network": np.zeros(len(y)), "boosting": np.zeros(len(y))}
    section = chosen("ensemble", preds, y, classify, 20, why)
    assert section["weights"] == {"network": 1.0, "boosting": 0.0}
    assert why in section["why"]
    # A member asked for by name is served whatever the validation split holds.
    assert chosen("boosting", preds, y, classify, 20, why)["weights"]["boosting"] == 1.0


@pytest.mark.parametrize(
    "n_out",
    [3, pytest.param(2, marks=pytest.mark.slow), 1],
    ids=["3-class", "binary", "regression"],
)
def test_one_graph_serves_the_weighted_members_at_batch_1_and_n(tmp_path: Path, n_out: int):
    """The merged graph's output is ensemble.combine of the torch network and the
    scikit-learn model (divided by a temperature), its `features` output the network's own."""
    classify = n_out > 1
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1) if classify else x[:, 0] + x[:, 1] ** 2
    y = np.minimum(y, n_out - 1) if classify else y
    boosting = fit_boosting(x[:200], y[:200], x[200:], y[200:], classify, BOOST, 0)
    torch.manual_seed(0)
    net = build_model(
        {"name": "mlp", "n_in": 6, "hidden": [8], "n_out": n_out, "dropout": 0.0}
    ).eval()
    path = tmp_path / "model.onnx"
    export_onnx(WithFeatures(net).eval(), torch.from_numpy(x[:2]), path, ("output", "features"))
    weights, temperature = {"network": 0.4, "boosting": 0.6}, 1.5 if classify else None
    graph = merge(onnx.load(str(path)), boosting, weights, temperature, classify, 6, n_out)
    onnx.save(graph, str(path))
    session = open_session(path, threads=1)
    assert [o.name for o in session.get_outputs()] == ["output", "features"]
    boosted = boosting.predict_proba(x) if classify else boosting.predict(x)
    expected = combine(member_outputs(predict(net, x), boosted, classify), weights, classify)
    expected = expected / (temperature or 1.0)
    for batch in (1, 300):
        out, feats = run_all(session, x, batch)
        assert out.shape == (300, n_out) and feats.shape == (300, 8)
        np.testing.assert_allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize("classify", [False, True])
def test_boosting_graph_takes_scikit_learns_branch_at_every_threshold(classify, tmp_path):
    """Features whose distinct values are neighbouring float32 numbers: scikit-learn splits
    half-way (a float64 between them), which ONNX's float32 thresholds cannot hold. The
    graph must answer exactly as scikit-learn on the training rows themselves."""
    rng = np.random.default_rng(0)
    # 60 values per column, each also as the next float32 above it: 120 distinct values,
    # under scikit-learn's 255 bins, so every split sits half-way between two of them
    base = rng.choice(rng.normal(size=60).astype(np.float32), size=(2000, 4))
    up = np.nextafter(base, np.float32(np.inf))
    x = np.where(rng.random(base.shape) < 0.5, base, up)
    y = x[:, 0] + x[:, 1] ** 2
    y = (y > np.median(y)).astype(int) if classify else y
    boosting = fit_boosting(x, y, None, None, classify, BOOST, 0)
    session = session_of(boosting_graph(boosting, 4, 17), tmp_path)
    got = session.run(None, {"input": x})[-1 if classify else 0]
    want = boosting.predict_proba(x) if classify else boosting.predict(x)
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5)


@pytest.mark.parametrize("classes", [2, 3])
def test_boosting_graph_keeps_small_probabilities(classes, tmp_path):
    """A confident classifier's smallest probabilities (1e-8 and below) as scikit-learn gives
    them, to float32's relative precision: the served output is their log."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 5)).astype(np.float32)
    y = np.minimum((x[:, 0] * 3 > 0).astype(int) + (x[:, 1] > 1), classes - 1)
    boosting = fit_boosting(
        x, y, None, None, True, SimpleNamespace(**{**vars(BOOST), "max_iter": 300}), 0
    )
    got = session_of(boosting_graph(boosting, 5, 17), tmp_path).run(None, {"input": x})[-1]
    want = boosting.predict_proba(x)
    assert want.min() < 1e-7  # confident enough to test the tails
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-30)


def session_of(graph: onnx.ModelProto, folder: Path):
    """The graph saved and opened as serving opens a model.onnx."""
    onnx.save(graph, str(folder / "boosting.onnx"))
    return open_session(folder / "boosting.onnx", threads=1)


@pytest.mark.slow
def test_boost_stage_falls_back_on_a_tiny_table_and_evaluate_reports_members(tmp_path: Path):
    """40 rows: a validation split too small to judge weights. boost says so in one line and
    serves the network; evaluate writes each member's scores under `members`, and export's
    card carries the section."""
    repo = copy_repo(tmp_path / "repo")
    rng = np.random.default_rng(0)
    rows = ["a,b,y"] + [f"{v:.3f},{w:.3f},{int(v > 0)}" for v, w in rng.normal(size=(40, 2))]
    (repo / "data/tabular/tiny.csv").write_text("\n".join(rows) + "\n")
    set_params(
        repo,
        {
            **TINY_TABULAR,
            "tabular.data.source": "data/tabular/tiny.csv",
            "tabular.data.target": "y",
        },
    )
    for name in ("prepare", "validate", "train"):
        stage(repo, name)
    out = stage(repo, "boost")
    assert "served: network=1.00 boosting=0.00 (the network alone:" in out.stderr + out.stdout
    stage(repo, "evaluate")
    m = json.loads((repo / "metrics/tabular/metrics.json").read_text())
    assert set(m["members"]) >= {"network", "boosting", "weights", "why"}
    assert m["members"]["network"]["accuracy"] == m["test"]["accuracy"]


def test_label_folds_mix_boosting_in_every_class_column():
    """The labels stage's fold boosting (stages/tabular/labels.py): the served iteration
    count, and a column per class even when the fold's training rows lack one."""
    from stages.core.params import load_params
    from stages.tabular.labels import fold_boosting

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) * 2  # classes 0 and 2 only: class 1 has no training row
    probs = fold_boosting(
        x, y, x[:5], 3, {"boosting_iterations": 7}, load_params().tabular.boost, 0
    )
    assert probs.shape == (5, 3) and (probs[:, 1] == 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_report_and_models_tab_name_members_weights_and_why():
    from app.ui import served_markdown
    from stages.core.card import Card
    from tools.report import served_md

    ensemble = {"weights": {"network": 0.7, "boosting": 0.3}, "why": "greedy selection"}
    metrics = {
        "test": {"accuracy": 0.973, "ece": 0.01},
        "members": {"network": {"accuracy": 0.9735}, "boosting": {"accuracy": 0.9705}},
    }
    card = Card.model_validate(
        {"task": "tabular", "kind": "classification", "onnx": ONNX}
    ).model_copy(update={"ensemble": ensemble, "metrics": metrics})
    md = served_md(card)
    assert "| boosting | 0.3 | 0.9705 |" in md and "| served | 1 | 0.973 |" in md
    assert "greedy selection" in md
    tab = served_markdown(ensemble, metrics)
    assert "network × 0.70 (alone: accuracy 0.9735)" in tab and "greedy selection" in tab
    assert served_md(card.model_copy(update={"ensemble": None})) == ""
    assert served_markdown(None, {}) == ""
