"""Serving: the REST API (TestClient, every endpoint, bad input), the Gradio handlers
through gradio_client against a launched server, schemathesis against its OpenAPI
schema, parity with the `infer` stage, no torch, and the Dockerfile lint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_python

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(served_repo, monkeypatch_module):
    from fastapi.testclient import TestClient

    monkeypatch_module.chdir(served_repo)
    from app.server import create_app

    return TestClient(create_app(ui=False), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def a_row(repo) -> dict:
    df = pd.read_parquet(repo / "data/prepared/tabular/test.parquet").drop(columns="species")
    return json.loads(df.head(1).to_json(orient="records"))[0]


def png_bytes(repo, task="image") -> bytes:
    folder = repo / (
        "data/demo/digits/3" if task == "image" else "data/prepared/detect/images/test"
    )
    return sorted(folder.iterdir())[0].read_bytes()


def test_health_ready_info_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["loaded"] == ["detect", "image", "tabular"]
    info = client.get("/model/info").json()["models"]
    assert (
        info["tabular"]["classes"] == ["Adelie", "Chinstrap", "Gentoo"]
        and info["detect"]["kind"] == "detection"
    )
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict/tabular", "/predict/image", "/predict/detect", "/ready", "/metrics"} <= set(
        paths
    )


def test_tabular_explain_adds_attributions_that_sum_to_the_answer(client, served_repo):
    row = a_row(served_repo)
    rows = [row, {**row, "sex": None, "bill_length_mm": None}]
    plain = client.post("/predict/tabular", json={"rows": rows}).json()["predictions"]
    assert "attributions" not in plain[0]  # only when asked: it costs model runs
    r = client.post("/predict/tabular?explain=true", json={"rows": rows})
    assert r.status_code == 200, r.text
    for p, q in zip(r.json()["predictions"], plain, strict=True):
        assert set(p["attributions"]) == set(row)  # keyed by the request's columns
        assert abs(p["base_value"] + sum(p["attributions"].values()) - p["probability"]) < 1e-6
        assert p["prediction"] == q["prediction"] and p["probability"] == q["probability"]
    assert client.post("/predict/tabular?explain=maybe", json={"rows": rows}).status_code == 422


def test_tabular_predictions_and_schema_checks(client, served_repo):
    row = a_row(served_repo)
    ok = client.post(
        "/predict/tabular", json={"rows": [row, {**row, "sex": None, "bill_length_mm": None}]}
    )
    assert ok.status_code == 200
    preds = ok.json()["predictions"]
    assert len(preds) == 2 and preds[0]["prediction"] in ("Adelie", "Chinstrap", "Gentoo")
    assert (
        preds[0]["warnings"] == [] and preds[1]["warnings"] == []
    )  # missing values that training had
    assert abs(sum(preds[0][f"p_{c}"] for c in ("Adelie", "Chinstrap", "Gentoo")) - 1) < 1e-6
    bad = {
        "missing field": {"rows": [{k: v for k, v in row.items() if k != "island"}]},
        "extra field": {"rows": [{**row, "colour": "blue"}]},
        "wrong type": {"rows": [{**row, "body_mass_g": "heavy"}]},
        "no rows": {"rows": []},
        "not a list": {"rows": "x"},
        "no body field": {"data": [row]},
    }
    for what, body in bad.items():
        r = client.post("/predict/tabular", json=body)
        assert r.status_code == 422, (what, r.status_code, r.text)
    # Values the model has not seen are answered, with a warning naming column and value
    # (issue 37); a raw row as it is in the CSV (its id and target columns) is accepted.
    odd = [{**row, "island": "Atlantis"}, {**row, "body_mass_g": 1e308}]
    raw = {**row, "species": "Adelie"}
    r = client.post("/predict/tabular", json={"rows": [*odd, raw]})
    assert r.status_code == 200, r.text
    warned = [p["warnings"] for p in r.json()["predictions"]]
    assert warned[0] == ["island = 'Atlantis' was never seen in training; read as unknown"]
    assert warned[1][0].startswith("body_mass_g = 1e+308 is outside the validated range")
    assert warned[2] == []
    too_many = client.post("/predict/tabular", json={"rows": [row] * 10001})
    assert too_many.status_code == 422 and "10000" in too_many.text


def test_image_and_detect_uploads(client, served_repo):
    r = client.post("/predict/image?top_k=2", files={"file": ("d.png", png_bytes(served_repo))})
    assert r.status_code == 200
    body = r.json()
    assert len(body["top_k"]) == 2 and body["prediction"] == body["top_k"][0]["class"]
    assert body["warnings"] == []
    d = client.post(
        "/predict/detect?conf=0.002", files={"file": ("s.png", png_bytes(served_repo, "detect"))}
    )
    assert (
        d.status_code == 200
        and d.json()["count"] == len(d.json()["detections"])
        and d.json()["warnings"] == []
    )
    for det in d.json()["detections"]:
        assert set(det) == {"category_id", "category", "score", "bbox"} and len(det["bbox"]) == 4


@pytest.mark.parametrize("path", ["/predict/image", "/predict/detect"])
def test_upload_bad_inputs_are_4xx(client, path):
    assert client.post(path, files={"file": ("x.png", b"not an image at all")}).status_code == 415
    assert client.post(path, files={"file": ("x.png", b"")}).status_code == 422
    assert client.post(path).status_code == 422  # no file
    big = client.post(path, files={"file": ("x.png", b"\0" * (10 * 1024 * 1024 + 10))})
    assert big.status_code == 413
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (6000, 5000)).save(buf, format="PNG")  # 30 M pixels > max_pixels, tiny file
    r = client.post(path, files={"file": ("huge.png", buf.getvalue())})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert (
        client.post(
            f"{path}?{'top_k=0' if 'image' in path else 'conf=2'}", files={"file": ("x.png", b"x")}
        ).status_code
        == 422
    )


def test_metrics_count_requests_errors_and_latency(client):
    text = client.get("/metrics").text
    # Each series names the version that answered (the card's model md5 here).
    version = client.get("/model/info/tabular").json()["provenance"]["model_md5"]
    assert f'requests_total{{status="200",task="tabular",version="{version}"}}' in text
    assert 'request_errors_total{task="image",version="' in text
    assert f'request_latency_seconds_bucket{{le="0.01",task="tabular",version="{version}"}}' in text
    assert 'model_info{role="served",sha256="' in text and f'version="{version}"}} 1.0' in text
    assert "worker_resident_memory_bytes " in text and "input_drift_psi" in text


def test_missing_models_do_not_stop_the_server(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.server import create_app

    monkeypatch.chdir(ROOT)
    c = TestClient(create_app(models_dir=tmp_path, ui=True), raise_server_exceptions=False)
    ready = c.get("/ready")
    assert ready.status_code == 503 and set(ready.json()["missing"]) == {
        "tabular",
        "image",
        "detect",
    }
    r = c.post("/predict/image", files={"file": ("x.png", b"x")})
    assert r.status_code == 503 and "make run" in r.json()["detail"]
    assert c.get("/").status_code == 200  # the UI still serves, each tab saying how to train


def test_app_imports_no_torch(served_repo):
    code = (
        "import sys; from app.server import create_app; create_app(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'ultralytics')]; "
        "assert not bad, bad; print('ok')"
    )
    assert run_python(served_repo, code).stdout.strip().endswith("ok")


def test_app_and_infer_give_identical_results(client, served_repo):
    """The same inputs through the REST API and through the `infer` stage's outputs."""
    preds = pd.read_csv(served_repo / "data/predictions/tabular.csv")
    test = pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet").drop(
        columns="species"
    )
    rows = json.loads(test.to_json(orient="records"))
    api = client.post("/predict/tabular", json={"rows": rows}).json()["predictions"]
    assert [p["prediction"] for p in api] == preds["prediction"].tolist()
    np.testing.assert_allclose([p["probability"] for p in api], preds["probability"], rtol=1e-5)

    images = pd.read_csv(served_repo / "data/predictions/image.csv").head(20)
    root = served_repo / "data/prepared/image"
    for row in images.itertuples():
        r = client.post(
            "/predict/image", files={"file": ("x.png", (root / row.path).read_bytes())}
        ).json()
        assert (
            r["prediction"] == str(row.prediction)
            and abs(r["probability"] - row.probability) < 1e-5
        )

    dets = json.loads((served_repo / "data/predictions/detect.json").read_text())
    folder = served_repo / "data/prepared/detect/images/test"
    for f in sorted(folder.iterdir())[:5]:
        r = client.post(
            "/predict/detect?conf=0.002&iou=0.7", files={"file": (f.name, f.read_bytes())}
        ).json()
        expected = [d for d in dets if d["file"] == f.name]
        assert [(d["category_id"], d["bbox"]) for d in r["detections"]] == [
            (d["category_id"], d["bbox"]) for d in expected
        ]


def test_gradio_functions_through_gradio_client(server, served_repo, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(server + "/", verbose=False)
    row = a_row(served_repo)
    card = json.loads((served_repo / "models/tabular/model.json").read_text())
    label, note = c.predict(*[row[f["name"]] for f in card["features"]], api_name="/tabular_form")
    assert label["label"] in ("Adelie", "Chinstrap", "Gentoo") and "All inputs are inside" in note
    assert f"{label['label']} (set: " in note and "training data" in note  # stages/core/trust.py
    _, note = c.predict(
        *[0.0 if f["name"] == "body_mass_g" else row[f["name"]] for f in card["features"]],
        api_name="/tabular_form",
    )
    assert "body_mass_g = 0 is outside the validated range" in note

    csv = tmp_path / "rows.csv"
    pd.read_parquet(served_repo / "data/prepared/tabular/test.parquet").head(7).to_csv(
        csv, index=False
    )
    out = pd.read_csv(c.predict(handle_file(str(csv)), api_name="/tabular_csv"))
    assert len(out) == 7 and list(out.columns[:3]) == ["line", "prediction", "probability"]
    assert out.columns[-1] == "warnings"
    wrong = tmp_path / "notes.txt"
    wrong.write_bytes(b"\x00\x01 not a table")
    with pytest.raises(Exception) as bad:  # a sentence about the file, not a Python message
        c.predict(handle_file(str(wrong)), api_name="/tabular_csv")
    assert "NoneType" not in str(bad.value) and "PathLike" not in str(bad.value)
    binary = tmp_path / "penguins.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00 not a table")
    with pytest.raises(Exception) as bad:
        c.predict(handle_file(str(binary)), api_name="/tabular_csv")
    assert "penguins.csv is not a CSV file" in str(bad.value) and "/tmp" not in str(bad.value)
    # A text file, and a PNG cut short, to the image and detect tabs: one sentence each.
    text, broken = tmp_path / "notes.png", tmp_path / "broken.png"
    text.write_text("my notes, not an image")
    digit_bytes = sorted((served_repo / "data/demo/digits/5").iterdir())[0].read_bytes()
    broken.write_bytes(digit_bytes[: len(digit_bytes) // 2])
    for api, extra in (("/image_one", ()), ("/detect_one", (0.25, 0.7))):
        for f, says in ((text, "notes.png is not an image"), (broken, "damaged or cut short")):
            with pytest.raises(Exception) as err:
                c.predict(handle_file(str(f)), *extra, api_name=api)
            msg = str(err.value)
            assert says in msg and "/tmp" not in msg and "Error:" not in msg.split(says)[1], msg

    digit = sorted((served_repo / "data/demo/digits/5").iterdir())[0]
    label, note = c.predict(handle_file(str(digit)), api_name="/image_one")
    assert label["label"] in [str(i) for i in range(10)] and note

    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(digit, "a/five.png")
        z.writestr(
            "../../evil.png", b"not an image"
        )  # a hostile name: read in memory, never extracted
    table = pd.read_csv(c.predict(handle_file(str(archive)), api_name="/image_zip"))
    assert table["name"].tolist() == ["a/five.png", "../../evil.png"]
    assert table["error"].isna().tolist() == [True, False]
    assert not (tmp_path.parent / "evil.png").exists()

    scene = sorted((served_repo / "data/prepared/detect/images/test").iterdir())[0]
    drawn, objects, note = c.predict(handle_file(str(scene)), 0.002, 0.7, api_name="/detect_one")
    assert drawn and set(objects["headers"]) == {"category", "score", "x", "y", "width", "height"}
    _, objects, note = c.predict(handle_file(str(scene)), 1.0, 0.7, api_name="/detect_one")
    assert objects["headers"] == [
        "category",
        "score",
        "x",
        "y",
        "width",
        "height",
    ] and note.startswith("No objects")


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    # tests/schemathesis_hooks.py puts NaN and ±Infinity into half of the JSON bodies.
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "NAN_LOG": str(tmp_path / "nan.log"),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--phases",
            "examples,coverage,fuzzing",
            "--no-color",
            "--suppress-health-check",
            "all",
            "--request-timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    poisoned = (tmp_path / "nan.log").read_text().splitlines()
    assert sum("/predict/tabular" in p for p in poisoned) >= 3, poisoned[:20]
    assert any("/infer" in p for p in poisoned), sorted(set(poisoned))


def test_dockerfile_passes_hadolint():
    res = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert '".[serve]"' in text and "torch" not in text.split("pip install")[1].split("\n")[0]


def test_paths_cannot_leave_their_folders(client, server):
    import urllib.error
    import urllib.request

    assert client.get("/model/info/tabular").json()["kind"] == "classification"
    for bad in ("../tabular", "..%2F..%2Fetc%2Fpasswd", "passwd"):
        assert client.get(f"/model/info/{bad}").status_code in (404, 422), bad
    # Gradio serves uploads and outputs only: not the repo, not the system.
    for probe in (
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../etc/passwd",
        "/gradio_api/file=params.yaml",
        "/file=/etc/passwd",
    ):
        try:
            with urllib.request.urlopen(server + probe, timeout=10) as r:
                body = r.read()
                assert b"root:" not in body and b"seed:" not in body, probe
        except urllib.error.HTTPError as e:
            assert e.code in (403, 404, 405), (probe, e.code)


def test_checkpoints_load_without_unpickling_code():
    """Every torch.load in the project is weights_only=True; Ultralytics loads through its safe loader."""
    import re

    for path in (ROOT / "stages").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, (path.name, call)
    assert 'ULTRALYTICS_SAFE_LOAD"] = "1"' in (ROOT / "stages/detect/yolo.py").read_text()
