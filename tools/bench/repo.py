"""The repository the benchmark sections measure: its trained models and test inputs, a
synthetic CSV shaped like its data, copies of it, and processes run in them with their peak
memory. Every section runs from the repository root (bench/__main__.py changes into it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core import layout
from stages.core.card import read_card
from stages.core.params import load_params

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is tools/bench/...)


@contextlib.contextmanager
def chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def model_inputs(task: str, n: int) -> np.ndarray:
    """Up to n preprocessed test inputs of a task, as the exported model takes them."""
    from stages.detect.boxes import load_for_detection
    from stages.image.data import preprocess
    from stages.tabular.data import Preprocessor

    card = read_card(layout.card(task))
    if task == "tabular":
        df = pd.read_parquet("data/prepared/tabular/test.parquet").head(n)
        return Preprocessor.from_dict(card.preprocessing).transform(df)
    if task == "image":
        paths = pd.read_csv("data/prepared/image/test.csv")["path"].head(n)
        return preprocess([Path("data/prepared/image") / p for p in paths], card.preprocessing)
    files = sorted(Path("data/prepared/detect/images/test").iterdir())[:n]
    return np.stack([load_for_detection(f, card.preprocessing["imgsz"])[0] for f in files])


def torch_model(task: str):
    """The torch model behind each export, in eval mode: ours, or Ultralytics' (fused)."""
    if task != "detect":
        import importlib

        from stages.core.onnx_export import load_model

        return load_model(
            layout.model_pt(task), importlib.import_module(f"stages.{task}.model").build_model
        )[0]
    from stages.detect import yolo

    yolo.configure()  # before importing ultralytics
    from ultralytics.nn.tasks import load_checkpoint

    model = load_checkpoint(str(layout.model_pt("detect")))[0]
    return model.fuse(verbose=False).eval()


def synthetic_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """A CSV shaped like the penguins data: its own lines (NA cells included) drawn at random."""
    header, *lines = Path(load_params().tabular.data.source).read_text().splitlines()
    lines = np.array(lines, dtype=object)
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:  # in blocks: 50M rows are 2 GB of text
        f.write(header + "\n")
        for start in range(0, rows, 1_000_000):
            f.write(
                "\n".join(lines[rng.integers(0, len(lines), min(1_000_000, rows - start))]) + "\n"
            )
    return path


# A small parent for the measured process: a child forked straight from this (large) process
# starts with this process's resident size in its peak-memory record on Linux.
PEAK_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)"
)


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run a command; (wall seconds, its peak resident memory in MiB)."""
    peak = cwd / ".peak_rss"
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(peak), *cmd],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seconds = time.perf_counter() - start
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr[-2000:]}")
    return seconds, int(peak.read_text()) / 1024


def set_keys(path: Path, values: dict) -> None:
    """Set dotted keys ({"tabular.data.source": ...}) in a params.yaml, as `dvc exp run -S`."""
    import yaml

    from stages.core.schema import overridden

    params = overridden(yaml.safe_load(path.read_text()), values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def copy_repo(dst: Path) -> Path:
    """The files git tracks (and untracked, unignored ones), as tests/conftest.py copies them."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, out.decode().split("\0")):
        if Path(rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(rel, dst / rel)
    return dst
