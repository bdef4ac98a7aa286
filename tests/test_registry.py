"""make promote (tools/registry.py): the gate in front of GTO's tags, and serving a stage.

The models are the tune study's experiments (the session's tuned_repo, copied): the worst
and the best by test accuracy, each applied and committed, then promoted in turn."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import run

pytestmark = pytest.mark.slow


def git(repo, *args):
    return run(repo, "git", "-c", "user.email=t@example.com", "-c", "user.name=test", *args)


def promote(repo, rev, check=True):
    return run(
        repo, "python", "-m", "tools.registry", "promote", "tabular", "--rev", rev, check=check
    )


@pytest.fixture(scope="module")
def registry(tuned_repo, tmp_path_factory):
    """The tuned repo copied; the worst experiment (as branch `worse`) promoted to prod
    (v0.0.1), then the best (branch `better`, v0.0.2). Returns (repo, {"worse": sha, "better":
    sha}, the second promotion's output)."""
    src, _ = tuned_repo
    repo = tmp_path_factory.mktemp("registry") / "repo"
    shutil.copytree(src, repo, ignore=lambda d, names: ["tmp"] if d.endswith(".dvc") else [])
    for key, value in (
        ("user.email", "t@example.com"),
        ("user.name", "test"),
    ):  # GTO's annotated tags need them
        git(repo, "config", key, value)
    accuracy = {}
    for baseline in json.loads(run(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            metrics = (exp["revs"][0].get("data") or {}).get("metrics") or {}
            accuracy[exp["name"]] = metrics["metrics/tabular/metrics.json"]["data"]["test"][
                "accuracy"
            ]
    worse, better = min(accuracy, key=accuracy.get), max(accuracy, key=accuracy.get)
    assert accuracy[worse] < accuracy[better], accuracy
    revs = {}
    for label, exp in (("worse", worse), ("better", better)):
        run(
            repo, "dvc", "exp", "branch", exp, label
        )  # a commit; its outputs are in the repo's DVC cache
        revs[label] = git(repo, "rev-parse", label).stdout.strip()
    first = promote(repo, revs["worse"])
    assert "no version yet" in first.stdout and "v0.0.1 → prod" in first.stdout, first.stdout
    return repo, revs, promote(repo, revs["better"]).stdout


def prod(repo) -> str:
    import gto.api

    return gto.api.find_versions_in_stage(str(repo), "tabular-model", "prod")[0].version


def test_the_gate_accepts_a_better_model(registry):
    repo, revs, out = registry
    assert "| test.accuracy |" in out and "FAIL" not in out, out
    assert "v0.0.2 → prod" in out and prod(repo) == "v0.0.2"
    tags = git(repo, "tag").stdout.split()
    assert {
        "tabular-model@v0.0.1",
        "tabular-model@v0.0.2",
        "tabular-model#prod#1",
        "tabular-model#prod#2",
    } <= set(tags)
    assert git(repo, "rev-list", "-n1", "tabular-model@v0.0.2").stdout.strip() == revs["better"]


def test_the_gate_refuses_a_worse_model_with_the_table(registry):
    repo, revs, _ = registry
    res = promote(repo, revs["worse"], check=False)
    assert res.returncode == 1 and "did not pass the gate" in res.stderr
    row = next(line for line in res.stdout.splitlines() if line.startswith("| test.accuracy |"))
    assert row.endswith("| FAIL |"), res.stdout
    assert (
        "| p50 latency, batch 1 (ms) |" in res.stdout
        and "| test split (prepared data md5) |" in res.stdout
    )
    assert prod(repo) == "v0.0.2"


def test_the_gate_refuses_a_model_whose_parity_failed(registry):
    repo, _, _ = registry
    git(repo, "checkout", "-q", "-b", "broken", "better")
    run(repo, "dvc", "checkout", "--with-deps", "infer@tabular")
    card_path = repo / "models/tabular/model.json"
    card = json.loads(card_path.read_text())
    card["parity"]["max_abs_diff"] = (
        10 * card["parity"]["atol"]
    )  # what a broken exporter would record
    card_path.write_text(json.dumps(card, indent=2))
    run(repo, "dvc", "commit", "-f", "export@tabular")
    git(repo, "commit", "-q", "-am", "a card whose parity failed")
    res = promote(repo, "HEAD", check=False)
    assert res.returncode == 1 and "| ONNX parity | False |  | passed | FAIL |" in res.stdout, (
        res.stdout
    )
    assert prod(repo) == "v0.0.2"


def test_serving_prod_loads_the_tagged_version(registry, monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    repo, revs, _ = registry
    folder = run(repo, "python", "-m", "tools.registry", "fetch", "prod").stdout.strip()
    run(
        repo,
        "dvc",
        "get",
        ".",
        "models/tabular/model.json",
        "--rev",
        "tabular-model@v0.0.2",
        "-o",
        str(tmp_path / "tagged.json"),
    )
    tagged = json.loads((tmp_path / "tagged.json").read_text())
    monkeypatch.chdir(repo)
    monkeypatch.setenv("APP_MODELS_DIR", str(repo / folder))
    from app.server import create_app

    with TestClient(create_app(ui=False)) as client:
        card = client.get("/model/info").json()["models"]["tabular"]
    assert card["registry"] == {
        "artifact": "tabular-model",
        "version": "v0.0.2",
        "commit": revs["better"],
        "stage": "prod",
    }
    assert (
        card["onnx"]["sha256"] == tagged["onnx"]["sha256"] and card["metrics"] == tagged["metrics"]
    )


def test_a_running_server_loads_a_version_and_follows_the_stage(registry, monkeypatch, tmp_path):
    """POST .../load {"version"} fetches and serves a registered version; with serve.model a
    stage, the follower loads the version the stage names when it differs (app/repository.py)."""
    from fastapi.testclient import TestClient

    repo, _, _ = registry
    folder = run(repo, "python", "-m", "tools.registry", "fetch", "prod").stdout.strip()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["serve"] |= {"model": "prod", "reload_s": 0}  # follow() is called by hand below
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(repo)
    monkeypatch.setenv("APP_MODELS_DIR", str(repo / folder))
    from app.server import create_app

    client = TestClient(create_app(params_path=tmp_path / "params.yaml", ui=False))
    load = client.post(
        "/v2/repository/models/tabular/load", json={"parameters": {"version": "v0.0.1"}}
    )
    assert load.status_code == 200 and load.json()["version"] == "v0.0.1", load.text
    assert client.get("/model/info/tabular").json()["registry"]["version"] == "v0.0.1"
    missing = client.post(
        "/v2/repository/models/tabular/load", json={"parameters": {"version": "v9.9.9"}}
    )
    assert missing.status_code == 404 and "v0.0.1" in missing.json()["error"]
    client.app.state.repository.follow()  # one tick of the serve.reload_s poller
    assert client.get("/model/info/tabular").json()["registry"]["version"] == "v0.0.2"
