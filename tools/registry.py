"""registry: versions and stages of each task's model, as GTO git tags, behind a gate.

    python -m tools.registry promote TASK [--stage prod] [--rev HEAD]   # make promote TASK=tabular STAGE=prod
    python -m tools.registry fetch [MODEL] [--out DIR]                  # make serve: serve.model → a models folder
    gto show                                                            # what is registered where

The artifacts are dvc.yaml's `artifacts:` (tabular-model, image-model, detect-model: the
ONNX file; its card, model.json, goes with it). A version is a commit of the repo:
`promote` reads the candidate's model.onnx + model.json at REV (committed, through DVC), the
stage's current version's likewise, and registers + assigns the candidate (GTO tags
`tabular-model@v0.0.2`, `tabular-model#prod#2`) only if it passes the gate:
  - the main test metric (tools/sweep.py RANK_BY; rmse for regression) is no worse than the
    current version's by more than `registry.tolerance`, measured on the same test split
    (the prepared data recorded in both cards' provenance must be the same);
  - ONNX parity and data validation passed (recorded in the card);
  - onnxruntime p50 latency at batch 1, both measured now side by side, is within
    `registry.max_latency_ratio` of the current version's.
Otherwise it prints the comparison table and exits 1. Push the tags: `git push --tags`.

`fetch` materialises what `serve.model` names (a stage such as prod, or a version such as
v0.0.2; `workspace` = models/ as it is) into .cache/registry/<name>/<task>/, with the
version written into each card (`registry`), and prints the folder: the app, which needs
neither DVC nor git, serves that folder (APP_MODELS_DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from stages.core import layout
from stages.core.card import Card, parse_card
from stages.core.cli import StageError, run_main
from stages.core.params import TASKS, load_params
from stages.core.schema import Registry
from tools.sweep import RANK_BY


def artifact(task: str) -> tuple[str, str]:
    """(artifact name, ONNX path) from dvc.yaml's artifacts."""
    name = f"{task}-model"
    entry = (yaml.safe_load(Path("dvc.yaml").read_text()).get("artifacts") or {}).get(name)
    if not entry:
        raise StageError(f"dvc.yaml: no artifact {name!r} under `artifacts:`")
    return name, entry["path"]


def git(*args: str) -> str:
    res = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    if res.returncode:
        raise StageError(f"git {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout.strip()


def fetch_version(task: str, rev: str, out: Path, info: dict | None = None) -> Card:
    """Write the task's model.onnx + model.json as of commit `rev` into out/<task>/ (the card
    gets `registry`: info); returns the card."""
    import dvc.api

    _, onnx_path = artifact(task)
    card_path = str(Path(onnx_path).with_name(layout.CARD_FILE))
    try:
        card = parse_card(dvc.api.read(card_path, repo=".", rev=rev))
        onnx = dvc.api.read(onnx_path, repo=".", rev=rev, mode="rb")
    except Exception as e:  # noqa: BLE001 - DVC raises several types for "not there"
        raise StageError(
            f"{onnx_path} + {layout.CARD_FILE} at {rev}: cannot read them ({type(e).__name__}: {e}); "
            "the models must be committed (dvc.lock) and in the DVC cache or remote"
        ) from None
    if hashlib.sha256(onnx).hexdigest() != card.onnx.sha256:
        raise StageError(
            f"{onnx_path} at {rev} is not the file its card describes (sha256 differs)"
        )
    if info:
        card = card.model_copy(update={"registry": info})
    (out / task).mkdir(parents=True, exist_ok=True)
    (out / task / card.onnx.file).write_bytes(onnx)
    (out / task / layout.CARD_FILE).write_text(json.dumps(card.dump(), indent=2))
    return card


def in_stage(name: str, stage: str):
    """The version of `name` that holds `stage` now (GTO's VStage), or None."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        found = gto.api.find_versions_in_stage(".", name, stage)
    except ArtifactNotFound:  # nothing registered yet
        return None
    return found[0] if found else None


def versions(name: str) -> list[dict]:
    """The registered versions of `name` (GTO's dicts: version, commit_hexsha, ...)."""
    import gto.api
    from gto.exceptions import ArtifactNotFound

    try:
        return gto.api.show(".", name, registered_only=True)
    except ArtifactNotFound:
        return []


def resolve(name: str, model: str):
    """(version, commit) that `model` (a stage or a version) names for the artifact, or None."""
    if model.startswith("v") and model[1:2].isdigit():
        for v in versions(name):
            if v["version"] == model:
                return v["version"], v["commit_hexsha"]
        return None
    vstage = in_stage(name, model)
    return (vstage.version, vstage.commit_hexsha) if vstage else None


def main_metric(card: Card) -> tuple[str, bool]:
    """(dotted key in the card's metrics, higher is better)."""
    if card.kind == "regression":
        return "test.rmse", False
    key, order = RANK_BY[card.task]
    return key.split(":", 1)[1], order == "desc"


def metric(card: Card, key: str) -> float:
    value = card.metrics
    for part in key.split("."):
        value = value[part]
    return float(value)


def parity_passed(card: Card) -> bool:
    """The card's parity numbers against the limits export checked them with."""
    parity, limits = card.parity or {}, card.params.get(f"{card.task}.export", {})
    if "max_abs_diff" in parity:
        return parity["max_abs_diff"] <= parity["atol"] and parity["class_agreement"] >= limits.get(
            "min_top1_agreement", 1.0
        )
    if "matched_of_onnx" in parity:
        return (
            min(parity["matched_of_ultralytics"], parity["matched_of_onnx"])
            >= limits["min_matched"]
        )
    return False


def test_split(card: Card) -> str | None:
    """The prepared data (hence the test split) the model was trained and evaluated on."""
    deps = card.provenance.get("deps") or {}
    return deps.get(f"data/prepared/{card.task}")


def p50_latencies(paths: list[Path], runs: int = 300) -> list[float]:
    """onnxruntime p50 seconds at batch 1 for each model, measured interleaved (so that
    other load on the machine hits both alike), one thread each, on zeros of the input's shape."""
    from stages.core.inference import open_session

    sessions, feeds = [], []
    for path in paths:
        s = open_session(path, threads=1, spinning=False)
        inp = s.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        sessions.append(s)
        feeds.append({inp.name: np.zeros(shape, np.float32)})
    times = [[] for _ in paths]
    for i in range(runs + 20):
        for j, (s, feed) in enumerate(zip(sessions, feeds, strict=False)):
            t0 = time.perf_counter()
            s.run(None, feed)
            if i >= 20:  # warm-up
                times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def gate(cand: Card, cur: Card | None, latency: list[float], cfg: Registry) -> list[tuple]:
    """Rows (check, candidate, current, rule, passed)."""
    key, higher = main_metric(cand)
    rows = [
        (
            "validation",
            cand.validation.success,
            "",
            "passed",
            bool(cand.validation.success),
        ),
        ("ONNX parity", parity_passed(cand), "", "passed", parity_passed(cand)),
        *coverage_rows(cand),
    ]
    if cur is None:
        return rows
    same = test_split(cand) is not None and test_split(cand) == test_split(cur)
    rows.append(("test split (prepared data md5)", test_split(cand), test_split(cur), "same", same))
    c, o, tol = metric(cand, key), metric(cur, key), cfg.tolerance
    ok = c >= o - tol if higher else c <= o + tol
    rows.append(
        (
            key,
            f"{c:.4f}",
            f"{o:.4f}",
            f"{'>=' if higher else '<='} current {'-' if higher else '+'} {tol}",
            ok,
        )
    )
    ratio = latency[0] / latency[1]
    rows.append(
        (
            "p50 latency, batch 1 (ms)",
            f"{latency[0] * 1e3:.3f}",
            f"{latency[1] * 1e3:.3f}",
            f"ratio {ratio:.2f} <= {cfg.max_latency_ratio}",
            ratio <= cfg.max_latency_ratio,
        )
    )
    return rows


def coverage_rows(card: Card) -> list[tuple]:
    """The conformal check (stages/core/trust.py): test coverage >= 1 - alpha - 0.05. A
    card without trust (detect, or a model exported before it) has no row."""
    if card.trust is None:
        return []
    floor = 1 - card.trust["alpha"] - 0.05
    c = metric(card, "test.coverage")
    return [
        (
            "test coverage (conformal)",
            f"{c:.4f}",
            "",
            f">= 1 - alpha - 0.05 = {floor:.2f}",
            c >= floor,
        )
    ]


def table(rows: list[tuple]) -> str:
    lines = ["| check | candidate | current | rule | result |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {c} | {a} | {b} | {r} | {'pass' if ok else 'FAIL'} |" for c, a, b, r, ok in rows]
    return "\n".join(lines)


def promote(task: str, stage: str = "prod", rev: str = "HEAD") -> str:
    """Register the model at `rev` as a new version of the task's artifact and assign it
    `stage`, if it passes the gate; returns the version."""
    import gto.api

    name, _ = artifact(task)
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    current = in_stage(name, stage)
    with tempfile.TemporaryDirectory() as tmp:
        cand = fetch_version(task, commit, Path(tmp) / "candidate")
        cur = fetch_version(task, current.commit_hexsha, Path(tmp) / "current") if current else None
        latency = (
            p50_latencies(
                [
                    Path(tmp) / "candidate" / task / cand.onnx.file,
                    Path(tmp) / "current" / task / cur.onnx.file,
                ]
            )
            if cur
            else []
        )
    rows = gate(cand, cur, latency, load_params().registry)
    print(
        f"{name} at {commit[:10]} against {stage}: "
        + (f"{current.version} ({current.commit_hexsha[:10]})" if current else "no version yet")
    )
    print(table(rows))
    if not all(ok for *_, ok in rows):
        raise StageError(f"{name} at {rev} did not pass the gate (FAIL above): not promoted")
    registered = [v for v in versions(name) if v["commit_hexsha"] == commit]
    version = (
        registered[0]["version"] if registered else gto.api.register(".", name, commit).version
    )
    if current and current.version == version:
        print(f"{name} {version} is {stage} already")
        return version
    gto.api.assign(".", name, stage, version=version)
    print(
        f"promoted: {name} {version} → {stage} (git tags {name}@{version}, {name}#{stage}#N; "
        "share them with `git push --tags`)"
    )
    return version


def fetch(model: str, out: Path | None = None) -> Path:
    """The models folder to serve for serve.model: models/ for `workspace`, else each task's
    version that `model` names, materialised under .cache/registry/<model>/."""
    if model in ("", "workspace"):
        return Path("models")
    out = out or Path(".cache/registry") / model
    for task in TASKS:
        name, _ = artifact(task)
        found = resolve(name, model)
        if found is None:
            print(f"{name}: no {model}: not served", file=sys.stderr)
            continue
        version, commit = found
        fetch_version(
            task,
            commit,
            out,
            {
                "artifact": name,
                "version": version,
                "commit": commit,
                **({} if model == version else {"stage": model}),
            },
        )
        print(f"{name}: {version} ({commit[:10]}) → {out / task}", file=sys.stderr)
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m tools.registry", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("promote", help="gate, register and assign a stage")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--stage", default="prod")
    p.add_argument("--rev", default="HEAD", help="the commit whose model is the candidate")
    f = sub.add_parser("fetch", help="materialise serve.model into a folder; prints it")
    f.add_argument("model", nargs="?", help="a stage or version (default: params.yaml serve.model)")
    f.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "promote":
        promote(args.task, args.stage, args.rev)
    else:
        print(fetch(args.model or load_params().serve.model, args.out))


if __name__ == "__main__":
    run_main(main)
