"""Shared fixtures: CPU only, tiny data, a fresh git + DVC copy of the repo per test."""
from __future__ import annotations

import os
import shutil
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
TINY_TABULAR = {"tabular.train.hidden": [16], "tabular.train.epochs": 10, "tabular.train.lr": 0.01, "tabular.train.patience": 0,
                "tabular.train.amp": "off"}


def copy_repo(dst: Path) -> Path:
    """Copy the files git tracks (and untracked, unignored ones) into dst; init git there."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "copy"], cwd=dst, check=True)
    return dst


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed git + DVC copy of this repository with tiny training params."""
    dst = copy_repo(tmp_path / "repo")
    set_params(dst, TINY_TABULAR)
    return dst


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


def run(repo: Path, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in repo (stages as `python -m stages.X task`), capturing output."""
    if cmd[0] == "python":
        cmd = (sys.executable, *cmd[1:])
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


def stage(repo: Path, name: str, task: str = "tabular", check: bool = True) -> subprocess.CompletedProcess:
    return run(repo, "python", "-m", f"stages.{name}", task, check=check)
