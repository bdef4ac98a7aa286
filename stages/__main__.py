"""The one entry point of the pipeline: `python -m stages STAGE TASK`.

    python -m stages prepare tabular
    python -m stages validate image --new-suite   # (re)create the suite from the training split
    python -m stages train detect

STAGE runs `stages/<task>/<stage>.py:run(params)`; dvc.yaml calls nothing else, and each
stage depends on stages/core/ and stages/<task>/ as folders, so a code change anywhere a
stage can reach reruns it (tests/test_deps.py keeps that true).
"""

from __future__ import annotations

import importlib
import time

from stages.core import numerics
from stages.core.cli import StageError, run_main
from stages.core.files import write_timing
from stages.core.params import TASKS, load_params

STAGES = ("demo", "prepare", "validate", "train", "boost", "evaluate", "export", "infer", "labels")
DEMOS = ("image", "detect")  # tabular's demo data is a file in git
LABELS = ("tabular", "image")  # classification labels to check (stages/core/label_issues.py)
BOOST = ("tabular",)  # gradient boosting beside the network (stages/tabular/boost.py)


def main(argv: list[str]) -> None:
    flags = [a for a in argv if a.startswith("--")]
    args = [a for a in argv if not a.startswith("--")]
    if len(args) != 2 or args[0] not in STAGES or args[1] not in TASKS:
        raise StageError(
            f"usage: python -m stages STAGE TASK, where STAGE is one of: {', '.join(STAGES)} "
            f"and TASK one of: {', '.join(TASKS)}"
        )
    stage, task = args
    if stage == "demo" and task not in DEMOS:
        raise StageError(f"there is no demo stage for {task}; tasks with one: {', '.join(DEMOS)}")
    if stage == "labels" and task not in LABELS:
        raise StageError(
            f"there is no labels stage for {task}; tasks with one: {', '.join(LABELS)}"
        )
    if stage == "boost" and task not in BOOST:
        raise StageError(f"there is no boost stage for {task}; tasks with one: {', '.join(BOOST)}")
    if flags and (stage, flags) != ("validate", ["--new-suite"]):
        raise StageError(
            f"unknown option {' '.join(flags)} (only `validate TASK --new-suite` takes one)"
        )
    params = load_params()
    # Before the stage's module loads torch / numpy / onnxruntime: they read it at load.
    numerics.pin(params.reproducible)
    start = time.perf_counter()
    run = importlib.import_module(f"stages.{task}.{stage}").run
    run(params, **({"new_suite": True} if flags else {}))
    # The stage's wall time, imports included (tools.realtables reports train's and labels').
    write_timing(f"stage-{stage}-{task}", {"seconds": round(time.perf_counter() - start, 2)})


if __name__ == "__main__":
    run_main(main)
