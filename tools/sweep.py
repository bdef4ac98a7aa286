"""sweep: queue a grid of experiments, run the queue, watch it, and rank the results.

    python -m tools.sweep sweeps/tabular-lr.yaml     # or: make sweep SWEEP=sweeps/tabular-lr.yaml

The sweep file names a task, a grid of params.yaml keys, the number of queue workers
and how long the queue may go without progress. Each combination becomes
`dvc exp run --queue -S key=value ... infer@<task>` (only that task's chain runs); then
`dvc queue start -j N` runs them, each in its own copy of the repo under .dvc/tmp/exps/.
A failed experiment's worker log is printed; a queue that makes no progress for
`stall_minutes` is reported with the way out instead of being waited on forever. The queue
is read through `dvc exp show --json`. tools/tune.py drives the queue with the same
functions (queue_experiment, start_workers, experiments, Watch, print_failed_log).
Promote the best one with `dvc exp apply NAME` (into the workspace) or
`dvc exp branch NAME BRANCH`.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from stages.core import layout
from stages.core.cli import StageError, run_main
from stages.core.params import load_params
from stages.core.schema import overridden, validate

# The metric each task's sweep is ranked by, and whether higher is better.
RANK_BY = {
    "tabular": (f"{layout.metrics('tabular')}:test.accuracy", "desc"),
    "image": (f"{layout.metrics('image')}:test.accuracy", "desc"),
    "detect": (f"{layout.metrics('detect')}:test.mAP50-95", "desc"),
}
DONE = ("success", "failed")
STALLED = (
    "the queue made no progress for {minutes} minutes ({summary}). See `dvc queue status` and "
    "`dvc queue logs NAME` (worker logs: .dvc/tmp/exps/celery/*.out); stop it with `dvc queue stop --kill` "
    "and clear it with `dvc exp clean` and `dvc queue remove --all`, then run it again"
)


def dvc(*args: str, check: bool = True) -> str:
    res = subprocess.run(["dvc", *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and res.returncode:
        raise StageError(
            f"dvc {' '.join(args)} failed:\n{res.stderr.strip() or res.stdout.strip()}"
        )
    return res.stdout


def combinations(grid: dict) -> list[dict]:
    keys = list(grid)
    return [
        dict(zip(keys, values, strict=False))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def queue_experiment(name: str, task: str, values: dict) -> None:
    """`dvc exp run --queue` of the task's chain (infer@task) with params.yaml keys overridden."""
    # -S takes Hydra's override grammar: numbers, true/false and [lists] as JSON writes them;
    # strings quoted, so that paths and colons stay one value.
    sets = [
        a
        for k, v in values.items()
        for a in ("-S", f"{k}={json.dumps(v) if not isinstance(v, str) else repr(v)}")
    ]
    dvc("exp", "run", "--queue", "-n", name, *sets, f"infer@{task}")


def wait_for_idle_workers(timeout: float = 60.0) -> None:
    """Wait (up to `timeout`) until no idle queue worker is left, e.g. from a sweep or tune
    that just ended. An idle worker exits about 10 s after it finds the queue empty, and one
    exiting can take an experiment queued at that moment and lose it (DVC then shows it
    running forever, with no worker; seen in CI). Busy workers are safe: they look at the
    queue again only when their experiment ends. `dvc queue status` has no JSON output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(
            r"Worker status: (\d+) active, (\d+) idle", dvc("queue", "status", check=False)
        )
        if not found or found.group(2) == "0" or found.group(1) != "0":
            return
        time.sleep(2)


def start_workers(jobs: int) -> subprocess.Popen:
    """`dvc queue start -j N`, beside us: it stays in the foreground while its workers run, and
    we watch the queue (and notice when it stalls) instead of waiting blind. Starting again
    while workers run adds none (they are named 1..N); idle workers exit after 10 s."""
    return subprocess.Popen(
        ["dvc", "queue", "start", "-j", str(jobs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_workers(starter: subprocess.Popen) -> None:
    try:
        starter.wait(timeout=120)  # the workers stop once the queue is empty
    except subprocess.TimeoutExpired:
        starter.terminate()


def experiments(names: list[str]) -> dict[str, tuple[str, dict]] | None:
    """{name: (state, data)} for the named experiments, from `dvc exp show --json`: state is
    queued | running | success | failed; data holds a finished one's params and metrics.
    None when DVC could not answer this time (e.g. a worker held a lock)."""
    res = subprocess.run(
        ["dvc", "exp", "show", "--json"],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode:
        return None
    found = {}
    for baseline in json.loads(res.stdout):
        for exp in baseline.get("experiments") or []:
            if exp.get("name") in names:
                # A successful experiment whose task record has been cleaned up has no executor.
                state = (exp.get("executor") or {}).get("state") or "success"
                found[exp["name"]] = (state, (exp.get("revs") or [{}])[0].get("data") or {})
    return found


class Watch:
    """A queue's progress, printed when it changes; no change for `stall_minutes` is an
    error that names the way out."""

    def __init__(self, total: int, stall_minutes: float):
        self.total, self.stall_minutes = total, stall_minutes
        self.last, self.changed = None, time.monotonic()

    def update(self, states: dict[str, str], note: str = "") -> bool:
        """True once `total` experiments are done."""
        done = sum(s in DONE for s in states.values())
        summary = (
            f"{done}/{self.total} done, {sum(s == 'running' for s in states.values())} running, "
            f"{sum(s == 'failed' for s in states.values())} failed{note}"
        )
        if summary != self.last:
            print(summary, flush=True)
            self.last, self.changed = summary, time.monotonic()
        elif time.monotonic() - self.changed > self.stall_minutes * 60:
            # The workers go on: they may still be wanted (logs, a slow but healthy run).
            raise StageError(STALLED.format(minutes=self.stall_minutes, summary=summary))
        return done >= self.total


def print_failed_log(name: str) -> None:
    print(f"\n--- {name} failed; its log (dvc queue logs {name}):", file=sys.stderr)
    print("\n".join(dvc("queue", "logs", name, check=False).splitlines()[-40:]), file=sys.stderr)


def run_sweep(spec_path: str, poll: float = 5.0) -> dict[str, str]:
    spec = yaml.safe_load(Path(spec_path).read_text())
    task, grid = spec.get("task"), spec.get("grid") or {}
    if task not in RANK_BY or not grid:
        raise StageError(
            f"{spec_path}: needs `task` (one of {', '.join(RANK_BY)}) and a non-empty `grid`"
        )
    params = load_params()
    for combo in combinations(grid):  # a misspelt key or a bad value fails here, not per run
        validate(overridden(params, combo))
    stamp = time.strftime("%H%M%S")
    names = []
    wait_for_idle_workers()
    for i, combo in enumerate(combinations(grid), start=1):
        name = f"{Path(spec_path).stem}-{i}-{stamp}"
        queue_experiment(name, task, combo)
        names.append(name)
        print(f"queued {name}: {combo}", flush=True)
    starter = start_workers(spec.get("jobs", 1))
    watch, states = Watch(len(names), spec.get("stall_minutes", 15)), {}
    while True:
        found = experiments(names)
        states = {n: s for n, (s, _) in found.items()} if found is not None else states
        if watch.update(states):
            break
        time.sleep(poll)
    wait_workers(starter)
    failed = [n for n in names if states.get(n) == "failed"]
    for name in failed:
        print_failed_log(name)
    metric, order = spec.get("metric", RANK_BY[task][0]), spec.get("order", RANK_BY[task][1])
    print(
        dvc(
            "exp",
            "show",
            "--no-pager",
            "--only-changed",
            "--sort-by",
            metric,
            "--sort-order",
            order,
            "--md",
        )
    )
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
