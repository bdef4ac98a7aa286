"""tune: a search that learns. Optuna proposes each trial's params, the DVC queue runs it.

    python -m tools.tune sweeps/tabular-tune.yaml [--trials N] [--jobs N]   # make tune TASK=tabular TRIALS=12

The tune file names a task, the params.yaml keys to search (`space`), the validation metric
to optimise and the pruner. Each trial is a `dvc exp run --queue -S ... -S tune.trial=...
infer@<task>` experiment named <study>-<number>; `dvc queue start -j N` runs them, one more
trial per worker waits in the queue, and a new trial is asked for (and queued) as soon as
one finishes, so TPE learns from every result but the latest few.
The training stage reports each epoch's metric to the study through `tune.trial` and stops
when the study prunes it (stages/core/job.py); it then ends normally and says "pruned" in
metrics/<task>/train/metrics.json, which is read back, like every result, from
`dvc exp show --json`. The study lives in .cache/tune/<study>.db (SQLite, git-ignored):
running the same tune file again continues it with N more trials, picking up the
experiments of an interrupted run. Progress, failed trials' logs and a stalled queue are
handled by tools/sweep.py's functions. At the end: the best trial, the params'
importances, plots in report/tune/, and how to promote it.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import yaml

from stages.core import layout
from stages.core.cli import StageError, run_main
from stages.core.params import load_params
from stages.core.schema import overridden, plain, validate
from tools.sweep import (
    Watch,
    experiments,
    print_failed_log,
    queue_experiment,
    start_workers,
    wait_for_idle_workers,
    wait_workers,
)

PLOTS = Path("report/tune")


def load_spec(path: str) -> dict:
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if (
        spec.get("task") not in ("tabular", "image")
        or not spec.get("space")
        or not spec.get("metric")
    ):
        # detect trains through Ultralytics' loop, which does not report epochs to a study.
        raise StageError(
            f"{path}: needs `task` (tabular or image), `metric` (a validation metric of the "
            f"training loop, e.g. val_acc) and a non-empty `space`"
        )
    params = load_params()
    for key, s in spec["space"].items():  # a misspelt key or an out-of-range bound fails here
        for value in s.get("choices") or [s.get("low"), s.get("high")]:
            validate(overridden(params, {key: value}))
    return spec


def suggest(trial, space: dict) -> dict:
    """The trial's value for each key: {choices: [...]}, or {low, high[, log]} (ints if both are)."""
    values = {}
    for key, s in space.items():
        if "choices" in s:
            # Optuna's choices are scalars: lists (e.g. hidden layers) go through it as JSON text.
            picked = trial.suggest_categorical(key, [json.dumps(c) for c in s["choices"]])
            values[key] = json.loads(picked)
        elif isinstance(s["low"], int) and isinstance(s["high"], int):
            values[key] = trial.suggest_int(key, s["low"], s["high"], log=s.get("log", False))
        else:
            values[key] = trial.suggest_float(key, s["low"], s["high"], log=s.get("log", False))
    return values


def defaults(space: dict) -> dict:
    """The current params.yaml values of the searched keys, as the study's first trial (the
    baseline every other trial is measured against), or {} when one lies outside the space."""
    params, found = plain(load_params()), {}
    for key, s in space.items():
        value = params
        for part in key.split("."):
            value = value[part]
        inside = value in s["choices"] if "choices" in s else s["low"] <= value <= s["high"]
        if not inside:
            return {}
        found[key] = json.dumps(value) if "choices" in s else value
    return found


def open_study(spec: dict, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = (Path(".cache/tune") / f"{name}.db").resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 60}}
    )
    sampler = optuna.samplers.TPESampler(
        seed=spec.get("seed"), constant_liar=True, n_startup_trials=spec.get("startup_trials", 5)
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        load_if_exists=True,
        direction=spec.get("direction", "maximize"),
    )
    if not study.user_attrs:  # a new study: what the training stage needs to report and prune
        pruner = spec.get("pruner") or {}
        for key, value in {
            "metric": spec["metric"],
            "startup_trials": pruner.get("startup_trials", 4),
            "warmup_epochs": pruner.get("warmup_epochs", 5),
        }.items():
            study.set_user_attr(key, value)
        if baseline := defaults(spec["space"]):
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    return study, storage, db


def best_trial(study):
    """The best complete trial; ties (penguins reach val_acc 1.0 often) go to the lower val_loss."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(
        done, key=lambda t: (sign * t.value, -t.user_attrs.get("best", {}).get("val_loss", 0.0))
    )


def record(study, storage, trial_number: int, name: str, state: str, data: dict, task: str) -> str:
    """Tell the study how the trial's experiment ended; returns complete | pruned | fail."""
    import optuna

    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial_number
    )
    storage.set_trial_user_attr(trial_id, "experiment", name)
    result = (
        ((data.get("metrics") or {}).get(str(layout.train_log(task) / layout.METRICS_FILE)) or {})
        .get("data", {})
        .get("tune")
    )
    if state != "success" or not result or result.get("trial") != trial_number:
        study.tell(trial_number, state=optuna.trial.TrialState.FAIL)
        return "fail"
    storage.set_trial_user_attr(trial_id, "best", result["best"])  # every metric of its best epoch
    if result["state"] == "pruned":
        study.tell(trial_number, state=optuna.trial.TrialState.PRUNED)
        return "pruned"
    study.tell(trial_number, result["best"][study.user_attrs["metric"]])
    return "complete"


def report(study, name: str) -> None:
    """The best trial, importances, plots, and how to promote it."""
    import optuna

    counts = {
        s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState
    }
    print(
        f"\nstudy {name}: {len(study.trials)} trials ("
        + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        + ")"
    )
    best = best_trial(study)
    if best is None:
        raise StageError("no trial completed: see the failed trials' logs above")
    metric = study.user_attrs["metric"]
    baseline = next(
        (t for t in study.trials if t.user_attrs.get("baseline") and t.value is not None), None
    )

    def scores(t) -> str:  # the tuned metric first, then the others of the trial's best epoch
        return ", ".join(
            f"{k}={v:.4g}"
            for k, v in {metric: t.value, **t.user_attrs.get("best", {})}.items()
            if k.startswith("val_")
        )

    print(f"best: trial {best.number} ({best.user_attrs.get('experiment')}): {scores(best)}")
    for key, value in best.params.items():
        print(f"  {key} = {value}")
    if baseline:
        print(f"baseline (the params.yaml values): trial {baseline.number}: {scores(baseline)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot

        PLOTS.mkdir(parents=True, exist_ok=True)
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        ax.figure.savefig(PLOTS / f"{name}-history.png", dpi=100, bbox_inches="tight")
        plots = [PLOTS / f"{name}-history.png"]
        scores = {t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
        try:
            if len(scores) < 2:  # fANOVA then splits importance evenly: numbers that mean nothing
                raise ValueError(
                    f"every complete trial scored {metric}={next(iter(scores)):.4g}; "
                    f"the tie went to the lowest val_loss"
                )
            importances = optuna.importance.get_param_importances(study)
            print("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()))
            ax = optuna.visualization.matplotlib.plot_param_importances(study)
            ax.figure.savefig(PLOTS / f"{name}-importance.png", dpi=100, bbox_inches="tight")
            plots.append(PLOTS / f"{name}-importance.png")
        except (RuntimeError, ValueError) as e:  # too few complete trials to tell
            print(f"importance: not yet ({e})")
        matplotlib.pyplot.close("all")
    print("plots: " + ", ".join(map(str, plots)))
    exp = best.user_attrs.get("experiment")
    print(
        f"\nPromote it: dvc exp apply {exp} && git commit -am 'tuned: {exp}' && "
        f"make promote TASK={study.user_attrs['task']}\n  (or keep it on a branch: dvc exp branch {exp} {exp})"
    )


def tune(spec_path: str, trials: int | None = None, jobs: int | None = None, poll: float = 10.0):
    # poll: each `dvc exp show --json` costs 1-2 s of CPU, taken from the trials on a small machine.
    import optuna

    spec = load_spec(spec_path)
    task, name = spec["task"], Path(spec_path).stem
    trials = trials or spec.get("trials", 12)
    # no more workers than trials: a worker with nothing to run only idles, then exits
    jobs = min(jobs or spec.get("jobs", 2), trials)
    study, storage, db = open_study(spec, name)
    study.set_user_attr("task", task)
    # Trials an interrupted run left running: wait for their experiments if DVC still has them.
    left = {
        f"{name}-{t.number}": t.number
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    }
    known = (experiments(list(left)) or {}) if left else {}
    pending = {
        exp: number for exp, number in left.items() if exp in known
    }  # experiment name → trial number
    for exp in set(left) - set(pending):
        study.tell(left[exp], state=optuna.trial.TrialState.FAIL)
    asked = 0

    def ask() -> None:
        nonlocal asked
        trial = study.ask()
        values = suggest(trial, spec["space"])
        exp = f"{name}-{trial.number}"
        queue_experiment(exp, task, {**values, "tune.trial": f"{db}:{name}:{trial.number}"})
        pending[exp] = trial.number
        asked += 1
        print(f"queued {exp}: {values}", flush=True)

    # `jobs` trials queued beyond the `jobs` running: a worker that finds the queue empty exits
    # (10 s later), and one exiting can take a trial queued at that moment and lose it (DVC
    # then shows it running forever; seen in CI). Asking one trial ahead of each worker keeps
    # the queue from running dry until the study's last trials; TPE proposes them knowing the
    # results of all but the `2 * jobs` latest trials.
    wait_for_idle_workers()
    while asked < min(2 * jobs, trials):
        ask()
    starters, started = [start_workers(jobs)], time.monotonic()
    watch, states, outcomes = (
        Watch(trials + len(pending) - asked, spec.get("stall_minutes", 15)),
        {},
        {},
    )
    while pending:
        for exp, (state, data) in (experiments(list(pending)) or {}).items():
            states[exp] = state
            if state in ("success", "failed"):
                outcomes[exp] = record(study, storage, pending.pop(exp), exp, state, data, task)
                if state == "failed":
                    print_failed_log(exp)
                if asked < trials:
                    ask()
        # Workers exit 10 s after the queue runs dry, and `dvc queue start` adds none while
        # they live: a trial queued in that window waits with no worker. Start them again
        # whenever trials wait and none runs (a no-op while workers are up).
        waiting = [e for e in pending if states.get(e, "queued") == "queued"]
        if waiting and "running" not in states.values() and time.monotonic() - started > 2 * poll:
            starters.append(start_workers(jobs))
            started = time.monotonic()
        watch.update(states, f", {sum(o == 'pruned' for o in outcomes.values())} pruned")
        if pending:
            time.sleep(poll)
    for starter in starters:
        wait_workers(starter)
    report(study, name)
    return study


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.tune", description=__doc__.split("\n")[0])
    ap.add_argument("spec", help="a tune file, e.g. sweeps/tabular-tune.yaml")
    ap.add_argument(
        "--trials", type=int, help="trials to add to the study (default: the file's `trials`)"
    )
    ap.add_argument("--jobs", type=int, help="queue workers (default: the file's `jobs`)")
    args = ap.parse_args(argv)
    tune(args.spec, args.trials, args.jobs)


if __name__ == "__main__":
    run_main(main)
