"""sweep: queue a grid of experiments, run the queue, watch it, and rank the results.

    python -m tools.sweep sweeps/tabular-lr.yaml     # or: make sweep SWEEP=sweeps/tabular-lr.yaml

The sweep file names a task, a grid of params.yaml keys, the number of queue workers
and how long the queue may go without progress. Each combination becomes
`dvc exp run --queue -S key=value ... infer@<task>` (only that task's chain runs); then
`dvc queue start -j N` runs them, each in its own copy of the repo under .dvc/tmp/exps/.
A failed experiment's worker log is printed; a queue that makes no progress for
`stall_minutes` is reported with the way out instead of being waited on forever.
Promote the best one with `dvc exp apply NAME` (into the workspace) or
`dvc exp branch NAME BRANCH`.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.core.common import StageError, run_main

# The metric each task's sweep is ranked by, and whether higher is better.
RANK_BY = {"tabular": ("metrics/tabular/metrics.json:test.accuracy", "desc"),
           "image": ("metrics/image/metrics.json:test.accuracy", "desc"),
           "detect": ("metrics/detect/metrics.json:test.mAP50-95", "desc")}
DONE = ("Success", "Failed")


def dvc(*args: str, check: bool = True) -> str:
    res = subprocess.run(["dvc", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and res.returncode:
        raise StageError(f"dvc {' '.join(args)} failed:\n{res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def combinations(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def queue_states(names: list[str]) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    states = {}
    for line in dvc("queue", "status", check=False).splitlines():
        fields = line.split()
        for name in names:
            if name in fields and fields[-1] in ("Queued", "Running", *DONE):
                states[name] = fields[-1]
    return states


def run_sweep(spec_path: str, poll: float = 5.0) -> dict[str, str]:
    spec = yaml.safe_load(Path(spec_path).read_text())
    task, grid = spec.get("task"), spec.get("grid") or {}
    if task not in RANK_BY or not grid:
        raise StageError(f"{spec_path}: needs `task` (one of {', '.join(RANK_BY)}) and a non-empty `grid`")
    stamp = time.strftime("%H%M%S")
    names = []
    for i, combo in enumerate(combinations(grid), start=1):
        name = f"{Path(spec_path).stem}-{i}-{stamp}"
        # -S takes Hydra's override grammar: numbers, true/false and [lists] as JSON writes them.
        sets = [a for k, v in combo.items() for a in ("-S", f"{k}={v if isinstance(v, str) else json.dumps(v)}")]
        dvc("exp", "run", "--queue", "-n", name, *sets, f"infer@{task}")
        names.append(name)
        print(f"queued {name}: {combo}", flush=True)
    # `dvc queue start` stays in the foreground while its workers run: start it beside us,
    # so that we can watch the queue (and notice when it stalls) instead of waiting blind.
    starter = subprocess.Popen(["dvc", "queue", "start", "-j", str(spec.get("jobs", 1))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stall = spec.get("stall_minutes", 15) * 60
    last_change, last, states = time.monotonic(), None, {}
    while True:
        states = queue_states(names)
        done = sum(s in DONE for s in states.values())
        summary = (f"{done}/{len(names)} done, {sum(s == 'Running' for s in states.values())} running, "
                   f"{sum(s == 'Failed' for s in states.values())} failed")
        if summary != last:
            print(summary, flush=True)
            last, last_change = summary, time.monotonic()
        if done == len(names):
            break
        if time.monotonic() - last_change > stall:
            starter.poll()  # the workers go on: they may still be wanted (logs, a slow but healthy run)
            raise StageError(f"the queue made no progress for {spec.get('stall_minutes', 15)} minutes ({summary}). "
                             "See `dvc queue status` and `dvc queue logs NAME` (worker logs: "
                             ".dvc/tmp/exps/celery/*.out); stop it with `dvc queue stop --kill` and clear it with "
                             "`dvc exp clean` and `dvc queue remove --all`, then run the sweep again")
        time.sleep(poll)
    try:
        starter.wait(timeout=120)  # the workers stop once the queue is empty
    except subprocess.TimeoutExpired:
        starter.terminate()
    failed = [n for n in names if states.get(n) == "Failed"]
    for name in failed:
        print(f"\n--- {name} failed; its log (dvc queue logs {name}):", file=sys.stderr)
        print("\n".join(dvc("queue", "logs", name, check=False).splitlines()[-40:]), file=sys.stderr)
    metric, order = spec.get("metric", RANK_BY[task][0]), spec.get("order", RANK_BY[task][1])
    print(dvc("exp", "show", "--no-pager", "--only-changed", "--sort-by", metric, "--sort-order", order, "--md"))
    print("Promote one: dvc exp apply NAME   or   dvc exp branch NAME BRANCH")
    if failed:
        raise StageError(f"{len(failed)} of {len(names)} experiments failed: {', '.join(failed)}")
    return states


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise StageError("usage: python -m tools.sweep SWEEP_FILE (e.g. sweeps/tabular-lr.yaml)")
    run_sweep(argv[0])


if __name__ == "__main__":
    run_main(main)
