"""A serving-only install (`pip install '.[serve]'` in a fresh venv) runs the app with no
torch on the machine's path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def test_serve_extra_runs_the_app_without_torch(tmp_path, served_repo):
    venv = tmp_path / "serve-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{ROOT}[serve]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    ).stdout
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert {
        "gradio",
        "fastapi",
        "uvicorn",
        "onnxruntime",
        "prometheus-client",
        "pandas",
        "pillow",
    } <= names
    assert not names & {"torch", "torchvision", "ultralytics", "dvc", "great-expectations"}, names

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(APP_HOST="127.0.0.1", APP_PORT=str(port), PATH=f"{venv / 'bin'}:/usr/bin:/bin")
    # cwd: the served repo, for its models/ and params.yaml; the code comes from the venv.
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 (the server outlives this block)
    proc = subprocess.Popen(
        [str(py), "-I", "-c", "from app.server import main; main()"],
        cwd=served_repo,
        env=env,
        stdout=log,
        stderr=log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                ready = json.loads(urllib.request.urlopen(f"{url}/ready", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        assert ready["loaded"] == ["detect", "image", "tabular"]
        digit = sorted((served_repo / "data/demo/digits/2").iterdir())[0]
        boundary = "b0undary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + digit.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        req = urllib.request.Request(
            f"{url}/predict/image",
            data=body,
            method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert json.loads(urllib.request.urlopen(req, timeout=30).read())["prediction"] in [
            str(i) for i in range(10)
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    no_torch = subprocess.run([str(py), "-I", "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
