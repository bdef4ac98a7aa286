"""Serving against the training data: the tabular fast path answers exactly as `infer`,
out-of-range values get warnings (serve.strict: 422), drift gauges rise for a shifted
stream and stay low for an unshifted one, the request log is bounded, and
`python -m tools.drift` turns it into a report."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, card_of, run

from stages.core.card import read_card


def settings(**changes):
    """The repository's serve settings with some changed (app/settings.py)."""
    from app.settings import load_settings

    return load_settings(ROOT / "params.yaml").replace(**changes)


def synthetic_card(rng):
    from stages.core.card import reference

    train = pd.DataFrame(
        {"mass": rng.normal(4000, 500, 2000), "island": rng.choice(["A", "B", "C"], 2000)}
    )
    return card_of(
        kind="regression",
        reference=reference(dict(train.items()), {"mass": [1000, 8000]}, "synthetic"),
    )


def stream(rng, n: int, shift: float = 0.0, island=("A", "B", "C")) -> list[dict]:
    return [
        {"mass": float(m), "island": str(i)}
        for m, i in zip(rng.normal(4000 + shift, 500, n), rng.choice(island, n), strict=False)
    ]


def test_monitor_psi_rises_for_a_shifted_stream_only(tmp_path):
    from app.monitor import Monitor

    rng = np.random.default_rng(0)
    card = synthetic_card(rng)
    cfg = settings(
        drift_window=500,
        request_log_sample=1.0,
        request_log_dir=str(tmp_path / "log"),
        request_log_mb=0.002,
        request_log_backups=2,
    )
    quiet = settings(drift_window=500, request_log_sample=0.0)
    same, moved = Monitor("tabular", card, cfg), Monitor("tabular", card, quiet)
    same.observe(stream(rng, 600))
    moved.observe(stream(rng, 600, shift=800, island=("A",)))
    assert max(same.drift().values()) < 0.1, same.drift()
    assert min(moved.drift().values()) > 0.25, moved.drift()
    assert Monitor("tabular", card, quiet).drift() == {}  # too few values: no number yet
    # The log rotates at request_log_mb and keeps request_log_backups old files.
    files = sorted((tmp_path / "log").iterdir())
    assert 1 < len(files) <= 3 and all(f.stat().st_size < 2.5 * 2**10 for f in files), files
    assert Monitor("tabular", card, quiet).warnings(
        [{"mass": 0.0, "island": "A"}, {"mass": 4000.0, "island": "D"}]
    ) == [
        [
            "mass = 0 is outside the validated range 1000 to 8000; training had "
            f"{card.reference['features']['mass']['min']:g} to {card.reference['features']['mass']['max']:g}"
        ],
        ["island = 'D' was never seen in training (known: A, B, C)"],
    ]


@pytest.fixture(scope="module")
def tab(served_repo):
    from app.repository import load_models

    models, _ = load_models(served_repo / "models", settings(request_log_sample=0.0))
    return models["tabular"]


def test_card_reference_comes_from_training_and_the_suite(served_repo, tab):
    ref = tab.card.reference["features"]
    train = pd.read_parquet(served_repo / "data/prepared/tabular/train.parquet")
    assert set(ref) == {f.name for f in tab.card.features}
    mass = ref["body_mass_g"]
    assert (
        mass["min"] == train["body_mass_g"].min()
        and mass["median"] == train["body_mass_g"].median()
    )
    assert (
        mass["valid"][0] <= mass["min"] and mass["valid"][1] >= mass["max"]
    )  # the suite's range, with its margin
    assert abs(sum(mass["shares"]) - 1) < 1e-4 and len(mass["shares"]) == len(mass["bins"]) + 1
    assert ref["island"]["mode"] == train["island"].mode()[0] and set(
        ref["island"]["valid"]
    ) == set(train["island"])
    for task in ("image", "detect"):
        card = read_card(served_repo / f"models/{task}/model.json")
        assert {"width", "height", "mode"} <= set(card.reference["features"]), task
    assert {"score", "box_size", "boxes"} <= set(card.reference["features"])


@pytest.mark.slow
def close(a, b, tol: float = 1e-6) -> bool:
    """a == b, numbers to within tol, through nested dicts and lists. The graph computes in
    float32 (about 6e-8 apart at 1), so 1e-6 is a few of its steps, far below any real change."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b


def test_fast_path_is_exactly_infer_on_the_test_split(served_repo, tab):
    from app.predict import predict_tabular
    from stages.core.inference import run_batches
    from stages.tabular import infer
    from stages.tabular.data import Preprocessor, type_features
    from stages.tabular.serving import Rows

    test = pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet").drop(
        columns=tab.card.target
    )
    rows = json.loads(test.to_json(orient="records"))  # missing cells → None
    rows[0]["sex"] = rows[1]["bill_length_mm"] = rows[2]["island"] = (
        None  # missing values, imputed / all-zero
    )
    rows[3]["year"] = int(rows[3]["year"])  # an int where a float is expected
    fast = Rows(tab.card)
    typed = type_features(pd.DataFrame(rows), tab.card.features, "t")
    x = fast.transform(rows)
    assert x.dtype == np.float32 and np.array_equal(
        x, Preprocessor.from_dict(tab.card.preprocessing).transform(typed)
    )
    expected = infer.predict(tab.card, tab.session, typed, "t").to_dict("records")
    assert fast.decode(run_batches(tab.session, x, 4096)) == expected  # exact, float for float
    for row, want in zip(
        rows[:8], expected, strict=False
    ):  # batch 1, as the app sees most requests
        # onnxruntime's kernels for one row (gemv, the tree ensemble's row loop) add in
        # another order than for a batch: the same answer to the last few bits.
        (got,) = fast.decode(run_batches(tab.session, fast.transform([row]), 1))
        assert close(got, want), (got, want)
    # The app: JSON rows (fast path) and a DataFrame (pandas path) answer alike.
    assert predict_tabular(tab, rows) == predict_tabular(tab, pd.DataFrame(rows))
    # What the fast path cannot type goes the pandas way: an unseen category is answered as
    # unknown, with a warning naming it (issue 37).
    assert fast.transform([{**rows[0], "island": "Atlantis"}]) is None
    assert fast.transform([{**rows[0], "body_mass_g": "heavy"}]) is None
    (answer,) = predict_tabular(tab, [{**rows[0], "island": "Atlantis"}])
    assert any("Atlantis" in w for w in answer["warnings"]), answer


def app_client(repo, tmp_path, **serve):
    from fastapi.testclient import TestClient

    from app.server import create_app

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["serve"].update(serve)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return TestClient(
        create_app(repo / "models", tmp_path / "params.yaml", ui=False),
        raise_server_exceptions=False,
    )


def gauges(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(
            r'^input_drift_psi\{feature="([^"]+)",task="tabular"\} (\S+)$', text, re.M
        )
    }


@pytest.mark.slow
def test_drift_gauges_strict_mode_and_the_report(served_repo, tmp_path, monkeypatch):
    monkeypatch.chdir(served_repo)
    train = pd.read_parquet("data/prepared/tabular/train.parquet").drop(columns="species")
    sample = train.sample(400, replace=True, random_state=1)
    shifted = sample.assign(
        body_mass_g=sample["body_mass_g"] + 1200, flipper_length_mm=sample["flipper_length_mm"] + 20
    )
    results = {}
    for name, frame in (("same", sample), ("shifted", shifted)):
        logs = tmp_path / name
        client = app_client(
            served_repo,
            tmp_path,
            drift_window=300,
            request_log_sample=1.0,
            request_log_dir=str(logs),
        )
        rows = json.loads(frame.to_json(orient="records"))
        for i in range(0, len(rows), 20):
            r = client.post("/predict/tabular", json={"rows": rows[i : i + 20]})
            assert r.status_code == 200, r.text
        results[name] = gauges(client)
    assert set(results["same"]) == set(train.columns)
    assert max(results["same"].values()) < 0.1, results["same"]
    assert (
        results["shifted"]["body_mass_g"] > 0.25 and results["shifted"]["flipper_length_mm"] > 0.25
    ), results
    assert results["shifted"]["island"] < 0.1

    # Out of range: a warning per row; with serve.strict on, a 422 naming the value.
    row = json.loads(sample.head(1).to_json(orient="records"))[0]
    lax = app_client(served_repo, tmp_path).post(
        "/predict/tabular", json={"rows": [row, {**row, "body_mass_g": 0}]}
    )
    assert [p["warnings"] for p in lax.json()["predictions"]][0] == []
    assert (
        "body_mass_g = 0 is outside the validated range"
        in lax.json()["predictions"][1]["warnings"][0]
    )
    strict = app_client(served_repo, tmp_path, strict=True)
    assert strict.post("/predict/tabular", json={"rows": [row]}).status_code == 200
    refused = strict.post("/predict/tabular", json={"rows": [row, {**row, "body_mass_g": 0}]})
    assert refused.status_code == 422 and "row 2: body_mass_g = 0" in refused.json()["detail"]

    # The report from the shifted stream's log: HTML and PNG, the moved features flagged.
    out = tmp_path / "report"
    res = run(
        served_repo,
        "python",
        "-m",
        "tools.drift",
        "--logs",
        str(tmp_path / "shifted"),
        "--out",
        str(out),
    )
    assert "tabular: 400 requests, shifted: " in res.stdout and "body_mass_g" in res.stdout, (
        res.stdout
    )
    summary = json.loads((out / "tabular.json").read_text())
    assert summary["requests"] == 400 and summary["features"]["body_mass_g"]["verdict"] == "shifted"
    assert (
        summary["features"]["body_mass_g"]["ks"] > 0.5
        and summary["features"]["island"]["verdict"] == "stable"
    )
    assert (out / "tabular.png").stat().st_size > 5000 and "<img src='data:image/png" in (
        out / "tabular.html"
    ).read_text()


@pytest.mark.slow
def test_rest_and_ui_share_one_limit_per_worker(served_repo, tmp_path, monkeypatch):
    from app.repository import load_models
    from app.ui import build_ui, tabular_form
    from stages.core.inference import physical_cores

    monkeypatch.chdir(served_repo)
    client = app_client(served_repo, tmp_path, concurrency=1, queue_timeout_s=0.2)
    models = client.app.state.models
    assert models["tabular"].limit is models["image"].limit is models["detect"].limit
    row = json.loads(
        pd.read_parquet("data/prepared/tabular/test.parquet")
        .drop(columns="species")
        .head(1)
        .to_json(orient="records")
    )[0]
    tab = models["tabular"]
    with tab.limit:  # the one slot held, as by a long request from either side
        busy = client.post("/predict/tabular", json={"rows": [row]})
        assert busy.status_code == 503 and "busy" in busy.json()["detail"]
        with pytest.raises(Exception, match="busy"):
            tabular_form(tab, *[row[f.name] for f in tab.card.features])
    assert client.post("/predict/tabular", json={"rows": [row]}).status_code == 200
    # Threads per worker: the cores shared out; Gradio's cache is cleaned.
    two, _ = load_models("models", settings(workers=2))
    assert two["tabular"].session.get_session_options().intra_op_num_threads == max(
        1, physical_cores() // 2
    )
    assert build_ui(
        models, {}, client.app.state.config.replace(gradio_cache_s=60)
    ).delete_cache == (
        60,
        60,
    )
