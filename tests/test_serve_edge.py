"""Serving for real clients, against a real server (uvicorn on a free port): the Open
Inference Protocol v2 through the real tritonclient (binary and JSON), strict input at the
edge (NaN/Infinity, chunked bodies over the limit, HEAD, 405, X-Request-ID), model_version,
offline /docs, and API keys on a second server. The codec and settings cores are tested
directly, without a server."""

from __future__ import annotations

import base64
import http.client
import json
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
from conftest import ROOT, params_with, serving

from app.settings import SettingsError, from_params, load_settings, parse_api_keys
from app.v2_tensors import TensorError, decode_bytes, encode_bytes, read_inputs, split_body
from stages.core.cli import StageError
from stages.core.schema import Serve

FEATURES = {
    "island": ["Biscoe", "Dream"],
    "bill_length_mm": [40.0, 41.0],
    "bill_depth_mm": [17.0, 18.0],
    "flipper_length_mm": [200.0, 190.0],
    "body_mass_g": [4000.0, 3500.0],
    "sex": ["male", ""],  # "" is a missing value in a BYTES tensor
    "year": [2008.0, 2009.0],
}
ROW = {
    "island": "Biscoe",
    "bill_length_mm": None,
    "bill_depth_mm": 17.0,
    "flipper_length_mm": 200,
    "body_mass_g": 4000,
    "sex": "male",
    "year": 2008,
}


def request(
    url: str, method: str = "GET", path: str = "/", body: bytes | None = None, headers=None
):
    """(status, headers, body) of one request, whatever its status."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def post_json(url, path, text: str, **headers):
    return request(
        url, "POST", path, text.encode(), {"Content-Type": "application/json", **headers}
    )


# ---------------------------------------------------------------- cores, no server
def test_settings_come_from_params_and_env_only(tmp_path, monkeypatch):
    s = load_settings(ROOT / "params.yaml")
    assert s.queue_timeout_s == 30 and s.concurrency == 2  # params.yaml's, not a literal's
    assert isinstance(s, Serve)  # the schema's serve section: its keys, types and ranges
    keys = tmp_path / "keys"
    keys.write_text("alpha\nbeta,gamma\n")
    env = {"APP_PORT": "9000", "APP_API_KEYS": str(keys), "APP_MODELS_DIR": "/m"}
    for name, value in {**env, "APP_MAX_ROWS": "3"}.items():
        monkeypatch.setenv(name, value)
    t = from_params(params_with({"tabular.infer.batch_size": 64}))
    assert (t.port, t.api_keys, t.models_dir, t.tabular_batch_size, t.max_rows) == (
        9000,
        ("alpha", "beta", "gamma"),
        "/m",
        64,
        s.max_rows,  # only the documented variables override
    )
    assert parse_api_keys(" a, b ,") == ("a", "b")
    monkeypatch.setenv("APP_PORT", "0")  # one range for params.yaml and the environment
    with pytest.raises(SettingsError, match="APP_PORT: '0'"):
        from_params(params_with({}))
    with pytest.raises(StageError, match="serve.port"):
        params_with({"serve.port": 0})
    with pytest.raises(StageError, match="serve.strict"):
        params_with({"serve.strict": "yes"})


def test_binary_tensor_codec():
    payload = encode_bytes([b"ab", b"", "c"])
    assert decode_bytes(payload, "x") == [b"ab", b"", b"c"]
    with pytest.raises(TensorError, match="length"):
        decode_bytes(payload[:3], "x")
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [2],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    req, tail = split_body(head + np.array([1.5, -2], "<f4").tobytes(), str(len(head)))
    assert read_inputs(req, tail)["a"][1].tolist() == [1.5, -2.0]
    bad = b'{"inputs": [{"name": "a", "datatype": "FP64", "shape": [2], "data": [1, NaN]}]}'
    with pytest.raises(TensorError, match="row 2, field a: NaN"):
        read_inputs(*split_body(bad, None))
    with pytest.raises(TensorError, match="shape"):
        read_inputs(
            *split_body(
                b'{"inputs": [{"name": "a", "datatype": "FP64", "shape": [3], "data": [1]}]}', None
            )
        )


# ---------------------------------------------------------------- v2 through tritonclient
@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.http as th

    return th, th.InferenceServerClient(urlparse(server).netloc)


def tabular_inputs(th, binary: bool, bill=None, extra=None):
    out = []
    for name, values in {**FEATURES, **(extra or {})}.items():
        if name == "bill_length_mm" and bill is not None:
            values = bill
        text = isinstance(values[0], str)
        t = th.InferInput(name, [2], "BYTES" if text else "FP64")
        t.set_data_from_numpy(
            np.array(values, dtype=object if text else np.float64), binary_data=binary
        )
        out.append(t)
    return out


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_tabular(triton, binary, served_repo):
    th, c = triton
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tabular")
    card = json.loads((served_repo / "models/tabular/model.json").read_text())
    meta = c.get_model_metadata("tabular")
    assert [i["name"] for i in meta["inputs"]] == [f["name"] for f in card["features"]]
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["island"] == "BYTES"
    trust = {"prediction_set", "ood_flagged", "ood_p_value"}
    why = {"attributions", "base_value"}  # computed only when asked for (docs/explain.md)
    outputs = {"label", "probabilities", "warnings", *trust, *why}
    assert {o["name"] for o in meta["outputs"]} == outputs
    assert meta["parameters"]["attribution_columns"] == card["explain"]["columns"]
    version = meta["versions"][0]
    assert c.is_model_ready("tabular", model_version=version)
    outs = [
        th.InferRequestedOutput(n, binary_data=binary)
        for n in ("label", "probabilities", "warnings", *sorted(trust), *sorted(why))
    ]
    r = c.infer("tabular", tabular_inputs(th, binary), outputs=outs, model_version=version)
    labels = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("label")]
    assert set(labels) <= set(card["classes"]) and len(labels) == 2
    # The trust fields as REST gives them: the label is in its set, a p-value per row.
    sets = [json.loads(v) for v in r.as_numpy("prediction_set")]
    assert all(label in s for label, s in zip(labels, sets, strict=True))
    assert r.as_numpy("ood_flagged").dtype == bool and r.as_numpy("ood_p_value").shape == (2,)
    assert np.allclose(r.as_numpy("probabilities").sum(axis=1), 1, atol=1e-5)
    # The answer's probability = base_value + the row's attributions (FP32 [N, columns]).
    attr = r.as_numpy("attributions")
    assert attr.dtype == np.float32 and attr.shape == (2, len(card["explain"]["columns"]))
    top = r.as_numpy("probabilities").max(axis=1)
    assert np.allclose(r.as_numpy("base_value") + attr.sum(axis=1), top, atol=1e-5)
    assert r.get_response()["model_version"] == version
    # As over REST (issue 37): an unseen category is answered with a warning naming it, a
    # raw row's other CSV columns (the target) are accepted; an Infinity names field and row.
    odd = {"island": ["Biscoe", "Atlantis"], "species": ["Adelie", "Gentoo"]}
    warned = c.infer("tabular", tabular_inputs(th, binary, extra=odd)).as_numpy("warnings")
    assert [w.decode() if isinstance(w, bytes) else w for w in warned] == [
        "",
        "island = 'Atlantis' was never seen in training; read as unknown",
    ]
    with pytest.raises(Exception, match=r"422.*row 2.*bill_length_mm"):
        c.infer("tabular", tabular_inputs(th, binary, bill=[40.0, np.inf]))
    if binary:  # NaN is a binary float tensor's missing value, imputed as null is
        assert c.infer("tabular", tabular_inputs(th, True, bill=[np.nan, 40.0])).as_numpy(
            "label"
        ).shape == (2,)
    else:  # NaN is not JSON: tritonclient writes it anyway, and the server says where it was
        with pytest.raises(Exception, match=r"422.*row 1, field bill_length_mm: NaN"):
            c.infer("tabular", tabular_inputs(th, False, bill=[np.nan, 40.0]))
    with pytest.raises(Exception, match="404.*no version"):
        c.get_model_metadata("tabular", model_version="v999")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_image_and_detect(triton, binary, served_repo):
    th, c = triton
    digit = sorted((served_repo / "data/demo/digits/3").iterdir())[0].read_bytes()
    scene = sorted((served_repo / "data/prepared/detect/images/test").iterdir())[0].read_bytes()

    def image_input(data: bytes):
        t = th.InferInput("image", [1], "BYTES")
        t.set_data_from_numpy(
            np.array([data if binary else base64.b64encode(data)], dtype=object), binary_data=binary
        )
        return [t]

    r = c.infer(
        "image",
        image_input(digit),
        outputs=[
            th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")
        ],
    )
    assert r.as_numpy("probabilities").shape == (1, 10) and r.get_response()["model_version"]
    d = c.infer(
        "detect",
        image_input(scene),
        parameters={"conf": 0.002},
        outputs=[
            th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "score", "bbox")
        ],
    )
    assert d.as_numpy("bbox").shape == (len(d.as_numpy("label")), 4) and len(
        d.as_numpy("score")
    ) == len(d.as_numpy("label"))
    assert {o["name"] for o in c.get_model_metadata("detect")["outputs"]} == {
        "label",
        "score",
        "bbox",
        "warnings",
    }
    with pytest.raises(Exception, match="415.*not an image"):
        c.infer("image", image_input(b"not an image"))


# ---------------------------------------------------------------- the HTTP edge (what curl sees)
def test_nan_and_infinity_are_422_naming_field_and_row(server):
    row = json.dumps(ROW)
    for literal in ("NaN", "Infinity", "-Infinity"):
        bad = row.replace('"bill_depth_mm": 17.0', f'"bill_depth_mm": {literal}')
        status, _, body = post_json(server, "/predict/tabular", f'{{"rows": [{row}, {bad}]}}')
        assert status == 422 and "row 2, field bill_depth_mm" in json.loads(body)["detail"], body
    typed = json.dumps({**ROW, "year": "x"})
    status, _, body = post_json(server, "/predict/tabular", f'{{"rows": [{typed}]}}')
    assert status == 422 and "row 1, field year" in json.loads(body)["detail"]
    missing = {k: v for k, v in ROW.items() if k != "sex"}
    status, _, body = post_json(server, "/predict/tabular", json.dumps({"rows": [missing]}))
    assert status == 422 and "row 1, field sex: Field required" in json.loads(body)["detail"]
    status, _, body = post_json(
        server, "/predict/tabular", json.dumps({"rows": [ROW]})
    )  # null: imputed
    assert status == 200 and json.loads(body)["model_version"]


def test_chunked_body_over_the_limit_is_413_without_reading_it(server):
    sent = [0]

    def chunks():  # 30 MB, chunked (no Content-Length)
        for _ in range(30):
            sent[0] += 1
            yield b" " * 2**20

    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request(
            "POST",
            "/predict/tabular",
            body=chunks(),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        r = conn.getresponse()
        status, body = r.status, r.read()
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed first
        r = conn.getresponse()
        status, body = r.status, r.read()
    assert status == 413 and b"10 MB" in body, (status, body)


def test_head_405_request_id_and_model_version(server, served_repo):
    status, headers, body = request(server, "HEAD", "/health")
    assert status == 200 and body == b"" and headers["content-type"] == "application/json"
    assert request(server, "HEAD", "/v2/health/ready")[0] == 200
    status, headers, _ = request(server, "GET", "/predict/tabular")
    assert status == 405 and "POST" in headers["allow"]
    assert request(server, "DELETE", "/v2/models/image/infer")[0] == 405
    status, _, body = request(server, "GET", "/v2/models/nope")
    assert status == 404 and "no model named 'nope'" in json.loads(body)["error"]
    _, headers, _ = request(server, "GET", "/health", headers={"X-Request-ID": "trace-42"})
    assert headers["x-request-id"] == "trace-42"
    generated = request(server, "GET", "/health")[1]["x-request-id"]
    assert len(generated) == 32 and generated != "trace-42"
    log = (served_repo / ".cache" / f"server-{urlparse(server).port}.log").read_text()
    assert '"request_id": "trace-42"' in log
    digit = sorted((served_repo / "data/demo/digits/3").iterdir())[0].read_bytes()
    import httpx

    r = httpx.post(server + "/predict/image", files={"file": ("d.png", digit)}, timeout=60)
    status, body = r.status_code, r.content
    card = json.loads((served_repo / "models/image/model.json").read_text())
    assert status == 200 and json.loads(body)["model_version"] == card["provenance"]["model_md5"]


def test_docs_and_redoc_have_no_external_urls(server):
    for page in ("/docs", "/redoc"):
        html = urllib.request.urlopen(server + page, timeout=10).read().decode()
        assert "static-offline-docs" in html and "cdn" not in html and "https://" not in html, html
    assert (
        urllib.request.urlopen(
            server + "/static-offline-docs/swagger-ui-bundle.js", timeout=10
        ).status
        == 200
    )


# ---------------------------------------------------------------- API keys, on a second server
@pytest.fixture(scope="module")
def keyed(served_repo, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("k-one-very-secret\nk-two-very-secret\n")
    with serving(served_repo, APP_API_KEYS=str(keys)) as url:
        yield url


def test_api_keys(keyed, served_repo):
    body = json.dumps({"rows": [ROW]})
    assert post_json(keyed, "/predict/tabular", body)[0] == 401
    assert post_json(keyed, "/predict/tabular", body, Authorization="Bearer wrong")[0] == 401
    assert (
        post_json(keyed, "/predict/tabular", body, Authorization="Bearer k-two-very-secret")[0]
        == 200
    )
    status, _, err = post_json(keyed, "/v2/models/tabular/infer", '{"inputs": []}')
    assert status == 401 and "error" in json.loads(err)
    assert (
        request(keyed, "GET", "/health")[0] == 200
        and request(keyed, "GET", "/v2/health/live")[0] == 200
    )
    assert request(keyed, "GET", "/v2/models/tabular")[0] == 200  # metadata is open, as health is
    import tritonclient.http as th

    c = th.InferenceServerClient(urlparse(keyed).netloc)
    ok = c.infer(
        "tabular", tabular_inputs(th, True), headers={"Authorization": "Bearer k-one-very-secret"}
    )
    assert ok.as_numpy("label").shape == (2,)
    for log in (served_repo / ".cache").glob("server-*.log"):
        assert "very-secret" not in log.read_text()
