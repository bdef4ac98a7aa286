"""The tabular network (stages/tabular/model.py): forward, ONNX export with embeddings and
ensembles, the auto batch/epochs rule, the loss it trains on, and evaluate's comparison
with HistGradientBoosting (margin and both fit times in metrics.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TABULAR, copy_repo, params_with, set_params, stage

from stages.core.cli import StageError
from stages.core.onnx_export import export_onnx
from stages.tabular.budget import auto_batch_size, auto_epochs, resolve
from stages.tabular.evaluate import comparison
from stages.tabular.model import TabularNet, build_model, smooth_clip
from stages.tabular.train import loss_sums

CONFIGS = {  # (embedding, ensemble)
    "plain": (0, 1),
    "embedding": (8, 1),
    "ensemble": (0, 4),
    "both": (8, 4),
}


def net(embedding: int, ensemble: int, classify: bool = True) -> TabularNet:
    torch.manual_seed(0)
    arch = {
        "name": "net",
        "n_in": 7,
        "n_numeric": 4,
        "hidden": [16, 8],
        "n_out": 3 if classify else 1,
        "dropout": 0.1,
        "embedding": embedding,
        "ensemble": ensemble,
        "classify": classify,
    }
    return build_model(arch)


def rows(n: int) -> torch.Tensor:
    """Four standardised numbers, one of them heavy-tailed, then three one-hot columns."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 7, generator=g)
    x[:, 0] = x[:, 0] ** 3 * 50  # z-scores in the hundreds
    x[:, 4:] = torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float()
    return x


def test_smooth_clip_bounds_heavy_tails():
    x = torch.tensor([0.0, 0.1, 3.0, 30.0, -1e6])
    y = smooth_clip(x)
    assert y[0] == 0 and abs(y[1] - 0.1) < 1e-3  # identity near zero
    assert (y.abs() <= 3).all() and y[-1] < -2.99  # bounded by 3 far out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("classify", [True, False])
def test_forward_shapes_and_finite(name, classify):
    embedding, k = CONFIGS[name]
    model = net(embedding, k, classify)
    x = rows(33)
    model.train()
    out = model(x)
    assert out.shape == ((33, k, 3 if classify else 1) if k > 1 else (33, 3 if classify else 1))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (33, 3 if classify else 1)
    assert torch.isfinite(out).all()
    if classify and k > 1:  # softmax of the output = the members' mean probability
        members = torch.softmax(model.body(_body_input(model, x)), -1).mean(1)
        assert torch.allclose(torch.softmax(out, -1), members, atol=1e-6)


def _body_input(model: TabularNet, x: torch.Tensor) -> torch.Tensor:
    num = smooth_clip(x[:, : model.n_numeric])
    if model.embed is not None:
        num = model.embed(num).flatten(1)
    return torch.cat([num, x[:, model.n_numeric :]], 1)


def test_old_mlp_models_still_load():
    model = build_model({"name": "mlp", "n_in": 7, "hidden": [8], "n_out": 2, "dropout": 0.0})
    assert model(rows(2)).shape == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["embedding", "both"])
@pytest.mark.parametrize("classify", [True, False])
def test_onnx_parity_batch_1_and_n(tmp_path: Path, name, classify):
    import onnxruntime as ort

    model = net(*CONFIGS[name], classify).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, rows(2), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 257):
        x = rows(n)
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(
    ("rows_", "batch", "epochs"),
    [(200, 32, 50), (6_500, 64, 20), (35_000, 512, 29), (200_000, 2048, 21)],
)
def test_auto_batch_and_epochs(rows_, batch, epochs):
    assert auto_batch_size(rows_) == batch
    assert auto_epochs(rows_, batch) == epochs
    auto = params_with({"tabular.train.batch_size": "auto", "tabular.train.epochs": "auto"})
    got = resolve(auto.tabular.train, rows_)
    assert (got.batch_size, got.epochs, got.lr) == (batch, epochs, auto.tabular.train.lr)


def test_auto_rule_bounds_and_integers_kept():
    for n in (1, 10, 10**4, 10**6, 10**8):
        b = auto_batch_size(n)
        assert 32 <= b <= 2048 and b & (b - 1) == 0
        assert 1 <= auto_epochs(n, b) <= 50
    assert auto_epochs(10**8, 2048) == 1  # a huge table: one pass is already many steps
    fixed = params_with({"tabular.train.batch_size": 7, "tabular.train.epochs": 3}).tabular.train
    assert resolve(fixed, 10**6) == fixed
    with pytest.raises(StageError, match="tabular.train.epochs: .*'many'"):
        params_with({"tabular.train.epochs": "many"})


def test_loss_ensemble_mean_and_smoothing_only_while_training():
    logits = torch.randn(5, 3, 4)  # 5 rows, 3 members, 4 classes
    y = torch.tensor([0, 1, 2, 3, 0])
    sums = loss_sums(True, 0.1)
    with torch.no_grad():
        plain = sums(logits, y)
    per_member = [
        torch.nn.functional.cross_entropy(logits[:, i], y, reduction="sum") for i in range(3)
    ]
    assert torch.allclose(plain["loss"], sum(per_member) / 3)
    assert plain["count"] == 5
    smoothed = sums(logits.requires_grad_(), y)["loss"]
    assert not math.isclose(float(smoothed), float(plain["loss"]), rel_tol=1e-4)
    reg = loss_sums(False, 0.1)(torch.zeros(4, 2, 1), torch.ones(4))
    assert reg["loss"] == 4 and reg["count"] == 4  # squared error 1 per row, members averaged


def test_comparison_margin_and_times(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    margin, cost = comparison({"accuracy": 0.9}, {"accuracy": 0.85}, 2.0)
    assert margin["margin_over_hgb"]["accuracy"] == pytest.approx(0.05)
    assert cost == {
        "train_seconds": None,
        "boost_seconds": None,
        "hgb_fit_seconds": 2.0,
        "train_over_hgb": None,
    }
    (tmp_path / ".cache/timings").mkdir(parents=True)
    (tmp_path / ".cache/timings/train-tabular.json").write_text(json.dumps({"seconds": 10.0}))
    margin, cost = comparison({"r2": 0.5}, {"r2": 0.6}, 2.0)
    assert margin["margin_over_hgb"]["r2"] == pytest.approx(-0.1)
    assert cost["train_over_hgb"] == 5.0


@pytest.mark.slow
def test_pipeline_writes_margin_and_times(tmp_path: Path):
    """prepare → train → evaluate on penguins with an ensemble and embeddings: metrics.json
    has the margin over HGB and both times, and the auto rule picked the batch size."""
    repo = copy_repo(tmp_path / "repo")
    set_params(
        repo,
        {
            **TINY_TABULAR,
            "tabular.train.epochs": 5,
            "tabular.train.ensemble": 4,
            "tabular.train.embedding": 4,
        },
    )
    stage(repo, "prepare")
    log = stage(repo, "train")
    assert "223 training rows: batch_size 32, epochs 5" in log.stdout + log.stderr
    stage(repo, "boost")
    stage(repo, "evaluate")
    m = json.loads((repo / "metrics/tabular/metrics.json").read_text())
    assert m["margin_over_hgb"]["accuracy"] == pytest.approx(
        m["test"]["accuracy"] - m["baseline_hgb"]["accuracy"]
    )
    assert m["test"]["accuracy"] > 0.9
    assert "cost" not in m  # wall times stay out of the outputs, which reproduce byte for byte
    cost = json.loads((repo / "metrics/tabular/cost.json").read_text())
    assert cost["train_seconds"] > 0 and cost["hgb_fit_seconds"] > 0
    time_file = json.loads((repo / ".cache/timings/train-tabular.json").read_text())
    assert (time_file["batch_size"], time_file["epochs"]) == (32, 5)
