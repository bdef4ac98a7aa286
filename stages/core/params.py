"""params.yaml: the one list of tasks and reading the file. Torch-free: `infer` and `app/` use it."""

from __future__ import annotations

from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"
# The one list of tasks: stages/<task>/ is its package, models/<task>/ its model.
TASKS = ("tabular", "image", "detect")


def load_params(path: str | Path = PARAMS_FILE) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)
