"""validate: two suites (from params.yaml detect.validate), one over the per-image table and
one over the per-box table, on all splits together.

    python -m stages validate detect               # creates the suites if they are missing
    python -m stages validate detect --new-suite   # (re)create them

The suites live in data/expectations/detect/<source name>.{images,boxes}.json.
"""

from __future__ import annotations

import pandas as pd

from stages.core import layout
from stages.core.cli import log
from stages.core.expectations import check, load_suite, save_suite, suite_path
from stages.core.files import read_json
from stages.core.schema import DetectValidate, Params


def suites(names: list[str], v: DetectValidate) -> list[dict]:
    """Two suites: one over the per-image table, one over the per-box table."""
    between = "expect_column_values_to_be_between"
    images = [
        {
            "type": "expect_column_values_to_be_null",
            "kwargs": {"column": "error"},
            "meta": {"why": "every image decodes"},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "has_image", "value_set": [True]},
            "meta": {"why": "a label file without an image"},
        },
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "has_label", "value_set": [True], "mostly": v.min_labelled},
            "meta": {
                "why": "images without labels are backgrounds; too many means a broken layout"
            },
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
    ]
    boxes = [
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "fields", "value_set": [5]},
            "meta": {"why": "class x y w h, all numbers"},
        },
        {
            "type": between,
            "kwargs": {"column": "cls", "min_value": 0, "max_value": len(names) - 1},
            "meta": {"why": "class id in range"},
        },
        {
            "type": "expect_column_values_to_not_be_null",
            "kwargs": {"column": "class_name"},
            "meta": {"why": "class id is a whole number naming a class"},
        },
        *(
            {"type": between, "kwargs": {"column": c, "min_value": 0, "max_value": 1}, "meta": {}}
            for c in "xy"
        ),
        *(
            {
                "type": between,
                "kwargs": {"column": c, "min_value": 0, "max_value": 1, "strict_min": True},
                "meta": {"why": "width and height > 0"},
            }
            for c in "wh"
        ),
        {
            "type": "expect_column_distinct_values_to_contain_set",
            "kwargs": {"column": "class_name", "value_set": names},
            "meta": {"why": "every class has boxes"},
        },
    ]
    return [
        {
            "name": "images",
            "expectations": images,
            "meta": {"created_from": "params.yaml detect.validate"},
        },
        {
            "name": "boxes",
            "expectations": boxes,
            "meta": {"created_from": "params.yaml detect.validate"},
        },
    ]


def run(params: Params, new_suite: bool = False) -> dict:
    prepared = layout.prepared("detect")
    schema = read_json(prepared / "dataset.json")
    images, boxes = (
        pd.read_parquet(prepared / "images.parquet"),
        pd.read_parquet(prepared / "boxes.parquet"),
    )
    paths = [suite_path("detect", schema["source"], part) for part in ("images", "boxes")]
    if new_suite or not all(p.exists() for p in paths):
        for path, suite in zip(
            paths, suites(schema["names"], params.detect.validate_), strict=False
        ):
            save_suite(path, suite)
        log(
            f"created {paths[0]} and {paths[1]} from params.yaml detect.validate: review, edit, commit them"
        )
    # All splits together: a broken label is broken in any split; rows say image and line.
    return check(
        [(load_suite(paths[0]), {"all": images}), (load_suite(paths[1]), {"all": boxes})],
        "detect",
        paths,
        {
            "images/all": f"{schema['source']} images (rows: image)",
            "boxes/all": f"{schema['source']} labels (rows: image:line)",
        },
    )
