"""params.yaml: the one list of tasks and reading the file, checked against the schema
(stages/core/schema.py). Torch-free: `infer` and `app/` use it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import yaml

from stages.core.cli import StageError
from stages.core.schema import Params, Task, validate

PARAMS_FILE = "params.yaml"
# The one list of tasks: stages/<task>/ is its package, models/<task>/ its model.
TASKS: tuple[str, ...] = get_args(Task)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """params.yaml as the schema's typed model (params.tabular.train.lr), after the check:
    every stage, tool and the server start here, so a misspelt key or a wrong value stops
    them with one line naming it."""
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return validate(params)
