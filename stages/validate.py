"""validate: run the task's Great Expectations suite on every split; stop the pipeline
with a readable summary when the data breaks it.

    python -m stages.validate tabular               # validate (creates the suite if missing)
    python -m stages.validate tabular --new-suite   # (re)create the suite from the training split

The suite lives in data/expectations/<task>/<source name>.json: commit it and edit it.
Outputs: metrics/<task>/validation.json and GX Data Docs in metrics/<task>/datadocs/.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.common import StageError, atomic_dir, load_params, log, read_json, run_main, task_from_argv, write_json
from stages.expectations import detect_suites, image_suite, load_suite, run_suites, save_suite, summarise, \
    tabular_suite

SPLITS = ("train", "val", "test")


def suite_path(task: str, source: str, part: str = "") -> Path:
    """One suite per data source, so switching the data never validates against a stale suite."""
    return Path("data/expectations") / task / f"{Path(source).stem}{'.' + part if part else ''}.json"


def validate_tabular(params: dict, new_suite: bool = False) -> dict:
    prepared = Path("data/prepared/tabular")
    schema = read_json(prepared / "schema.json")
    tables = {name: pd.read_parquet(prepared / f"{name}.parquet") for name in SPLITS}
    path = suite_path("tabular", schema["source"])
    if new_suite or not path.exists():
        v = params["tabular"]["validate"]
        save_suite(path, tabular_suite(tables["train"], schema, v["range_margin"], v["null_margin"]))
        log(f"created {path} from the training split: review it, edit it, commit it")
    # Failing rows are reported by index, which holds the source CSV's line numbers, not
    # positions in the parquet files: say so.
    return check([(load_suite(path), tables)], "tabular", [path],
                 {name: f"{prepared}/{name}.parquet, rows numbered by line of {schema['source']}"
                  for name in SPLITS})


def validate_image(params: dict, new_suite: bool = False) -> dict:
    prepared = Path("data/prepared/image")
    schema = read_json(prepared / "schema.json")
    index = pd.read_parquet(prepared / "index.parquet")
    tables = {name: index[index["split"] == name] for name in SPLITS}
    path = suite_path("image", schema["source"])
    if new_suite or not path.exists():
        save_suite(path, image_suite(schema["classes"], params["image"]["validate"]))
        log(f"created {path} from params.yaml image.validate: review it, edit it, commit it")
    return check([(load_suite(path), tables)], "image", [path],
                 {name: f"{schema['source']}, {name} split; rows are file paths" for name in SPLITS})


def validate_detect(params: dict, new_suite: bool = False) -> dict:
    prepared = Path("data/prepared/detect")
    schema = read_json(prepared / "dataset.json")
    images, boxes = pd.read_parquet(prepared / "images.parquet"), pd.read_parquet(prepared / "boxes.parquet")
    paths = [suite_path("detect", schema["source"], part) for part in ("images", "boxes")]
    if new_suite or not all(p.exists() for p in paths):
        for path, suite in zip(paths, detect_suites(schema["names"], params["detect"]["validate"])):
            save_suite(path, suite)
        log(f"created {paths[0]} and {paths[1]} from params.yaml detect.validate: review, edit, commit them")
    # All splits together: a broken label is broken in any split; rows say image and line.
    return check([(load_suite(paths[0]), {"all": images}), (load_suite(paths[1]), {"all": boxes})], "detect", paths,
                 {"images/all": f"{schema['source']} images (rows: image)",
                  "boxes/all": f"{schema['source']} labels (rows: image:line)"})


def check(pairs: list[tuple[dict, dict[str, pd.DataFrame]]], task: str, paths: list[Path],
          sources: dict[str, str]) -> dict:
    """Run the suites, write the report and Data Docs, and fail loudly if any table breaks them."""
    with atomic_dir(Path("metrics") / task / "datadocs") as docs:
        report = run_suites(pairs, docs_dir=docs)
    report["suite_file"] = ", ".join(str(p) for p in paths)
    path = " and ".join(str(p) for p in paths)
    write_json(Path("metrics") / task / "validation.json", report)
    total = sum(len(t["results"]) for t in report["tables"].values())
    if not report["success"]:
        raise StageError(f"data does not meet the expectations in {path}\n{summarise(report, sources)}\n"
                         f"Fix the data, or edit {path} if the change is intended. "
                         f"Full report: metrics/{task}/validation.json, metrics/{task}/datadocs/index.html")
    log(f"validation passed: {total} checks over {', '.join(report['tables'])} ({path})")
    return report


def main(argv: list[str]) -> None:
    new_suite = "--new-suite" in argv
    task = task_from_argv([a for a in argv if a != "--new-suite"])
    {"tabular": validate_tabular, "image": validate_image, "detect": validate_detect}[task](load_params(), new_suite)


if __name__ == "__main__":
    run_main(main)
