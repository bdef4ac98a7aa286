"""Benchmark section 6: pipeline overhead (`dvc repro` with nothing to do, `dvc status`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.bench.timing import Row, alternate, median


# ------------------------------------------------------------------ 6. pipeline overhead
def pipeline(quick: bool, scratch: Path) -> dict:
    """`dvc repro` with nothing to do, and `dvc status`, in this repository (read-only)."""
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    class Busy(Exception):
        """Another dvc command (a `dvc repro` someone runs here) holds the repository's lock."""

    def run(*args, tries=10):
        for _ in range(tries):  # wait a little for another dvc command to let go of its lock
            res = subprocess.run([dvc, *args], capture_output=True, text=True, env=env)
            if res.returncode == 0 or "is busy" not in res.stderr:
                break
            time.sleep(3)
        if res.returncode:
            raise (Busy if "is busy" in res.stderr else subprocess.SubprocessError)(
                f"dvc {' '.join(args)}: {res.stderr.strip()[-500:]}"
            )
        return res.stdout

    def changed() -> list[str]:
        return sorted(json.loads(run("status", "--json") or "{}"))

    def check(name):  # before every `dvc repro`: never reproduce a pipeline that is not up to date
        if name == "repro" and changed():
            raise RuntimeError("the pipeline changed during the bench")

    try:
        stale, notes = changed(), []
    except Busy as e:
        return {
            "rows": [],
            "notes": [f"not measured: the repository is busy ({str(e).splitlines()[0]})"],
            "details": {"busy": True},
        }
    rounds, warmup = (1, 0) if quick else (5, 1)
    try:
        if stale:
            raise RuntimeError(
                f"`dvc status` lists {len(stale)} changed stages ({', '.join(stale)})"
            )
        times = alternate(
            {"repro": lambda: run("repro"), "status": lambda: run("status")},
            rounds,
            warmup=warmup,
            before=check,
        )
        what, cmd = "dvc repro, nothing changed", "dvc repro"
    except RuntimeError as e:  # time what `dvc repro` checks without letting it run anything
        notes.append(f"{e}: timed `dvc repro --dry` instead, so that nothing is rerun here")
        times = alternate(
            {"repro": lambda: run("repro", "--dry"), "status": lambda: run("status")},
            rounds,
            warmup=warmup,
        )
        what, cmd = "dvc repro --dry (pipeline not up to date)", "dvc repro --dry"
    med = {k: median(v) for k, v in times.items()}
    rows = [
        Row(
            what,
            (cmd, med["repro"], "s"),
            ("dvc status", med["status"], "s"),
            med["repro"] / med["status"],
            "repro <= 1.5 s",
            med["repro"] <= 1.5 if cmd == "dvc repro" else None,
        )
    ]
    return {
        "rows": rows,
        "notes": notes,
        "details": {"seconds": med, "up_to_date": not stale, "changed_stages": stale},
    }
