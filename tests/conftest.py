"""Shared fixtures: CPU only, tiny data, a fresh git + DVC copy of the repo per test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Tests run on the CPU, as CI does, and never phone home.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["GX_ANALYTICS_ENABLED"] = "False"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"

# Small enough for seconds per stage, large enough to learn the penguins.
TINY_TABULAR = {
    "tabular.train.hidden": [16],
    "tabular.train.epochs": 10,
    "tabular.train.lr": 0.01,
    "tabular.train.patience": 0,
    "tabular.train.amp": "off",
    "tabular.labels.folds": 2,  # the labels stage (issue 31) runs in every tabular `dvc repro`
    "tabular.labels.epochs": 5,
}


def copy_repo(dst: Path) -> Path:
    """Copy the files git tracks (and untracked, unignored ones) into dst; init git there."""
    from tools.realtables import repo_copy

    return repo_copy(dst)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed git + DVC copy of this repository with tiny training params."""
    dst = copy_repo(tmp_path / "repo")
    set_params(dst, TINY_TABULAR)
    return dst


def params_with(values: dict, path: Path = ROOT / "params.yaml"):
    """params.yaml's typed params with dotted keys set ({"tabular.data.source": "x.csv"}),
    checked by the schema as a stage would be: what an in-process stage test runs with."""
    from stages.core.params import load_params
    from stages.core.schema import replaced

    return replaced(load_params(path), values)


def card_of(**fields):
    """A model card (stages/core/card.py Card) with just the fields a test needs, and the
    ONNX block every card has."""
    from stages.core.card import Card

    onnx = {"file": "model.onnx", "sha256": "", "input": "x", "output": "y", "input_shape": []}
    return Card.model_validate(
        {"task": "tabular", "kind": "classification", "onnx": onnx, **fields}
    )


def set_params(repo: Path, values: dict) -> None:
    """Set dotted keys in repo/params.yaml, e.g. {"tabular.train.epochs": 2}."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def run(
    repo: Path, *cmd: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a command in repo (stages as `python -m stages X task`), capturing output."""
    if cmd[0] == "python":
        cmd = (sys.executable, *cmd[1:])
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
        )
    return res


def run_python(repo: Path, code: str, **kw) -> subprocess.CompletedProcess:
    """Run Python code in repo from a script file, not `python -c`: with pyspark installed, GX
    imports pyspark.sql.connect, which takes a `-c` process (no __main__.__file__) for its own
    doctest run and exits 0 on the spot ("Skipping doctests: No module named 'grpc'")."""
    script = repo / ".cache" / f"snippet-{os.getpid()}.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(code)
    return run(repo, "python", str(script), **kw)


def stage(
    repo: Path, name: str, task: str = "tabular", check: bool = True
) -> subprocess.CompletedProcess:
    return run(repo, "python", "-m", "stages", name, task, check=check)


# Every task, tiny: the served repo's models exist but are not meant to be good.
TINY_ALL = {
    **TINY_TABULAR,
    "image.demo.size": 16,
    "image.data.image_size": 16,
    "image.train.epochs": 1,
    "image.train.batch_size": 128,
    "image.labels.folds": 2,
    "image.labels.epochs": 1,
    "detect.demo.images": 30,
    "detect.demo.size": 64,
    "detect.train.imgsz": 64,
    "detect.train.epochs": 1,
    "detect.train.batch": 8,
    "detect.train.workers": 0,
    "detect.evaluate.coco_tolerance": 0.01,
    "detect.export.conf": 0.002,
    "detect.export.min_matched": 0.9,
}


@pytest.fixture(scope="session")
def served_repo(tmp_path_factory) -> Path:
    """A repo copy with all three tasks reproduced on tiny params: models to serve."""
    repo = copy_repo(tmp_path_factory.mktemp("served"))
    set_params(repo, TINY_ALL)
    run(repo, "dvc", "repro", timeout=900)
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(repo: Path, **env: str):
    """`python -m app.server` on a free port of 127.0.0.1 in repo (env: e.g. APP_WORKERS="2"); yields its URL."""
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "APP_HOST": "127.0.0.1", "APP_PORT": str(port), **env}
    log = (
        repo / ".cache" / f"server-{port}.log"
    )  # a file, not a pipe: a full pipe would stall the server
    log.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.server"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 (the server outlives this block)
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    try:
        yield url
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server the tests started; kill it if it does not go within 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def server(served_repo):
    """`python -m app.server` on a free port of 127.0.0.1 in the served repo; yields its URL."""
    with serving(served_repo) as url:
        yield url


# A tune study small enough for tests: lr from "learns nothing" to "learns", so some trials prune.
TINY_TUNE = """task: tabular
metric: val_acc
trials: 6
jobs: 2
seed: 3
pruner: {startup_trials: 1, warmup_epochs: 0}
stall_minutes: 8
space:
  tabular.train.lr: {low: 0.000001, high: 0.05, log: true}
"""


@pytest.fixture(scope="session")
def tuned_repo(tmp_path_factory) -> tuple[Path, str]:
    """A repo copy on tiny params, validated and committed, then a 6-trial tune over
    the DVC queue (sweeps/tiny-tune.yaml); (repo, the tune's stdout). Its experiments are
    the registry tests' models."""
    repo = copy_repo(tmp_path_factory.mktemp("tuned"))
    set_params(
        repo,
        {
            **TINY_TABULAR,
            "tabular.train.epochs": 4,
            "tabular.evaluate.baseline": False,
            # the network alone is served: its lr is what the trials vary (with the ensemble,
            # boosting carried every trial to the same test accuracy and the registry tests
            # found no worse model to refuse)
            "tabular.boost.models": "network",
        },
    )
    (repo / "sweeps/tiny-tune.yaml").write_text(TINY_TUNE)
    run(repo, "dvc", "repro", "validate@tabular")  # so that no trial prepares and validates again
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]
    run(repo, *git, "add", "-A")
    run(repo, *git, "commit", "-q", "-m", "baseline + tune file")
    return repo, run(
        repo, "python", "-m", "tools.tune", "sweeps/tiny-tune.yaml", timeout=900
    ).stdout
