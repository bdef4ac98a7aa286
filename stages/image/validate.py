"""validate: the image suite (from params.yaml image.validate) on the index of every split.

    python -m stages validate image               # creates the suite if it is missing
    python -m stages validate image --new-suite   # (re)create it

The suite lives in data/expectations/image/<source name>.json: commit it and edit it.
"""

from __future__ import annotations

import pandas as pd

from stages.core import layout
from stages.core.cli import log
from stages.core.expectations import SPLITS, check, load_suite, save_suite, suite_path
from stages.core.files import read_json
from stages.core.schema import ImageValidate, Params


def suite(classes: list[str], v: ImageValidate) -> dict:
    """Expectations over the per-image table that `prepare` writes (one row per file)."""
    between = "expect_column_values_to_be_between"
    exps = [
        {
            "type": "expect_column_values_to_be_null",
            "kwargs": {"column": "error"},
            "meta": {"why": "every file decodes"},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "mode", "value_set": v.modes},
            "meta": {},
        },
        {
            "type": between,
            "kwargs": {"column": "width", "min_value": v.min_size, "max_value": v.max_size},
            "meta": {},
        },
        {
            "type": between,
            "kwargs": {"column": "height", "min_value": v.min_size, "max_value": v.max_size},
            "meta": {},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "label", "value_set": classes},
            "meta": {},
        },
        {
            "type": between,
            "kwargs": {"column": "class_count", "min_value": v.min_per_class},
            "meta": {"why": "a minimum number of images per class"},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "dup_across_splits", "value_set": [False]},
            "meta": {"why": "the same file in two splits leaks test data into training"},
        },
    ]
    return {
        "name": "image",
        "expectations": exps,
        "meta": {"created_from": "params.yaml image.validate"},
    }


def run(params: Params, new_suite: bool = False) -> dict:
    prepared = layout.prepared("image")
    schema = read_json(prepared / layout.COLUMNS_FILE)
    index = pd.read_parquet(prepared / "index.parquet")
    tables = {name: index[index["split"] == name] for name in SPLITS}
    path = suite_path("image", schema["source"])
    if new_suite or not path.exists():
        save_suite(path, suite(schema["classes"], params.image.validate_))
        log(f"created {path} from params.yaml image.validate: review it, edit it, commit it")
    return check(
        [(load_suite(path), tables)],
        "image",
        [path],
        {name: f"{schema['source']}, {name} split; rows are file paths" for name in SPLITS},
    )
