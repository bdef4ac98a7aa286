"""Bad inputs, through the real stage CLI: each one stops its stage with exit status 1 and
a short `error: ...` (no traceback) that names the file, the column and, for a bad cell,
its CSV line (header = line 1), and leaves every earlier output byte for byte as it was.

One good pipeline run (tiny params) is shared by the module; each test works on its own
copy of it, so a failing stage that did write something could not hide behind another.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_TABULAR, copy_repo, run, set_params, stage

PENGUINS = "data/tabular/penguins.csv"
# Everything the pipeline writes; a failing stage must change none of it.
OUTPUTS = ("data/prepared", "data/predictions", "models", "metrics")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A repo copy on which every tabular stage has run once, successfully."""
    repo = copy_repo(tmp_path_factory.mktemp("bad_inputs") / "repo")
    set_params(repo, TINY_TABULAR)
    for name in ("prepare", "validate", "train", "boost", "evaluate", "export", "infer"):
        stage(repo, name)
    return repo


@pytest.fixture
def good(pipeline: Path, tmp_path: Path) -> Path:
    """This test's own copy of the good pipeline's repo (outputs included)."""
    return shutil.copytree(pipeline, tmp_path / "repo", symlinks=True)


def snapshot(repo: Path) -> dict[str, str]:
    """sha256 of every output file, hidden ones included (a leftover temp file is a change)."""
    files = [p for d in OUTPUTS for p in sorted((repo / d).rglob("*")) if p.is_file()]
    return {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def penguins(repo: Path) -> list[list[str]]:
    """The raw CSV as rows of strings (rows[0] is the header, rows[n - 1] is line n)."""
    with open(repo / PENGUINS, newline="") as f:
        return list(csv.reader(f))


def to_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def set_cell(rows: list[list[str]], line: int, column: str, value: str) -> list[list[str]]:
    rows[line - 1][rows[0].index(column)] = value
    return rows


def drop_column(rows: list[list[str]], column: str) -> list[list[str]]:
    i = rows[0].index(column)
    return [r[:i] + r[i + 1 :] for r in rows]


def add_column(rows: list[list[str]], column: str, values) -> list[list[str]]:
    return [rows[0] + [column]] + [r + [v] for r, v in zip(rows[1:], values, strict=False)]


def fails(
    repo: Path, name: str, *patterns: str, max_lines: int = 2, may_change: tuple[str, ...] = ()
) -> str:
    """Run stage `name`, expect exit 1 with a short error matching every pattern and no
    output changed (except paths under `may_change`); returns stderr."""
    before = snapshot(repo)
    res = stage(repo, name, check=False)
    err = res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    assert len(err.splitlines()) <= max_lines, err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    after = snapshot(repo)
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and not k.startswith(may_change)
    )
    assert not changed, f"outputs changed: {', '.join(changed)}"
    return err


def write_input(repo: Path, rel: str, content: str | bytes | None) -> str:
    """Write a bad input at repo/rel (None: leave it missing); returns rel."""
    if content is not None:
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return rel


# --- prepare: the training CSV --------------------------------------------------------


def _not_utf8(rows):
    return to_csv(set_cell(rows, 30, "island", "Bißcoe")).encode("latin-1")


def _ragged(rows):
    rows[19].append("extra")  # line 20 has one field too many
    return to_csv(rows)


def _one_small_class(rows):
    adelie = [r for r in rows[1:] if r[0] == "Adelie"][:20]
    return to_csv([rows[0], *adelie, next(r for r in rows if r[0] == "Gentoo")])


# id: (file content from the penguins rows, or None for no file; patterns; extra params)
PREPARE_CASES = {
    "missing": (lambda rows: None, [r"no such file"], {}),
    "empty": (lambda rows: b"", [r": the file is empty"], {}),
    "blank_lines": (lambda rows: "\n  \n\n", [r": the file is empty"], {}),
    "header_only": (lambda rows: to_csv(rows[:1]), [r": no data rows \(only a header\)"], {}),
    "header_only_no_newline": (
        lambda rows: ",".join(rows[0]),
        [r": no data rows \(only a header\)"],
        {},
    ),
    "no_target": (
        lambda rows: to_csv(drop_column(rows, "species")),
        [r": target column 'species' not found; columns are: island, "],
        {},
    ),
    # A word in a numeric column is no longer an error (issue 37): roles.mostly_numbers
    # (tests/test_tabular_data.py::test_numbers_with_a_few_words_get_a_role_that_runs).
    # empty target cells are no longer an error: the rows are dropped and counted
    # (tests/test_tabular_roles.py::test_missing_targets_dropped_and_counted)
    "one_class": (
        lambda rows: to_csv([r for r in rows if r[0] in ("species", "Adelie")]),
        [r": target 'species' has one class \('Adelie'\); classification needs at least two"],
        {},
    ),
    "text_regression_target": (
        lambda rows: to_csv(rows),
        [r": regression target 'island' is not numeric"],
        {"tabular.data.target": "island", "tabular.data.task": "regression"},
    ),
    "not_utf8": (_not_utf8, [r": not a readable CSV \(.*utf-8"], {}),
    "ragged_row": (_ragged, [r": not a readable CSV \(.*Expected 8 fields in line 20, saw 9"], {}),
}


@pytest.mark.parametrize("case", PREPARE_CASES)
def test_prepare_rejects_bad_csv(good: Path, case: str):
    make, patterns, params = PREPARE_CASES[case]
    source = write_input(good, f"data/tabular/{case}.csv", make(penguins(good)))
    set_params(good, {"tabular.data.source": source, **params})
    fails(good, "prepare", "^error: " + re.escape(source), *patterns)


def test_a_class_too_small_to_stratify_falls_back_with_a_warning(good: Path):
    """A class of one row is no longer an error (issue 28): the split is drawn unstratified,
    and the run says so."""
    source = write_input(good, "data/tabular/one_small_class.csv", _one_small_class(penguins(good)))
    set_params(good, {"tabular.data.source": source})
    res = stage(good, "prepare")
    assert "class 'Gentoo' of 'species' has 1 row(s): the split is not stratified" in res.stderr
    schema = json.loads((good / "data/prepared/tabular/columns.json").read_text())
    assert sum(schema["rows"].values()) == 21


# --- infer: the CSV to predict on ----------------------------------------------------

INFER_CASES = {
    "missing": ("csv", lambda rows: None, [r": no such file"]),
    "missing_parquet": ("parquet", lambda rows: None, [r": no such file"]),
    "empty": ("csv", lambda rows: b"", [r": the file is empty"]),
    "header_only": ("csv", lambda rows: to_csv(rows[:1]), [r": no data rows \(only a header\)"]),
    "text_in_numeric": (
        "csv",
        lambda rows: to_csv(set_cell(rows, 10, "bill_length_mm", "abc")),
        [r": column 'bill_length_mm' must be numeric but has text in 1 rows \(line 10: 'abc'\)"],
    ),
    "missing_feature": (
        "csv",
        lambda rows: to_csv(drop_column(rows, "bill_length_mm")),
        [r": missing feature columns: bill_length_mm$"],
    ),
}


@pytest.mark.parametrize("case", INFER_CASES)
def test_infer_rejects_bad_input(good: Path, case: str):
    ext, make, patterns = INFER_CASES[case]
    source = write_input(good, f"data/new/{case}.{ext}", make(penguins(good)))
    set_params(good, {"tabular.infer.source": source})
    fails(good, "infer", "^error: " + re.escape(source), *patterns, max_lines=4)


def test_infer_accepts_the_same_csv_unharmed(good: Path):
    """The control for the cases above: the untouched CSV (target and all) predicts fine."""
    source = write_input(good, "data/new/ok.csv", to_csv(penguins(good)))
    set_params(good, {"tabular.infer.source": source})
    stage(good, "infer")
    preds = pd.read_csv(good / "data/predictions/tabular.csv", keep_default_na=False)
    assert preds["line"].tolist() == list(range(2, 2 + len(penguins(good)) - 1))
    assert (preds["warnings"] == "").all()


def test_infer_predicts_unseen_values_with_warnings(good: Path):
    """Issue 37: an unseen category is predicted (read as unknown) with a warning in the
    row's `warnings` column and a count per column in metrics; the batch is not refused."""
    rows = set_cell(penguins(good), 5, "island", "Atlantis")
    source = write_input(good, "data/new/odd.csv", to_csv(rows))
    set_params(good, {"tabular.infer.source": source})
    res = stage(good, "infer")
    assert "expect_column_values_to_be_in_set on 'island': 1 of" in res.stderr
    preds = pd.read_csv(good / "data/predictions/tabular.csv", keep_default_na=False)
    assert len(preds) == len(rows) - 1
    warned = preds.set_index("line")["warnings"]
    assert warned[5] == "island = 'Atlantis' was never seen in training; read as unknown"
    assert (warned.drop(5) == "").all()
    stats = json.loads((good / "metrics/tabular/infer.json").read_text())
    assert stats["warnings"] == {"island": 1}


# --- validate: a prepared split that breaks the suite --------------------------------


def test_validate_names_expectation_column_value_and_line(good: Path):
    test_split = good / "data/prepared/tabular/test.parquet"
    df = pd.read_parquet(test_split)
    line = int(df.index[3])
    # The index is the CSV line: the original value there is the one in penguins.csv.
    rows = penguins(good)
    assert float(rows[line - 1][rows[0].index("bill_length_mm")]) == df.loc[line, "bill_length_mm"]
    df.loc[line, "bill_length_mm"] = 5000.0
    df.to_parquet(test_split)

    err = fails(
        good,
        "validate",
        r"^error: data does not meet the expectations in "
        r"data/expectations/tabular/penguins\.json",
        r"test \(data/prepared/tabular/test\.parquet, rows numbered by line of data/tabular/penguins\.csv\)"
        r": 1 of \d+ expectations failed",
        rf"expect_column_values_to_be_between on column 'bill_length_mm' .*: "
        rf"1 unexpected, e\.g\. 5000\.0 \(row {line}\)",
        max_lines=6,
        may_change=("metrics/tabular/validation.json", "metrics/tabular/datadocs"),
    )
    assert "train (" not in err and "val (" not in err  # only the broken split is reported

    report = json.loads((good / "metrics/tabular/validation.json").read_text())
    assert report["success"] is False
    assert {name: t["success"] for name, t in report["tables"].items()} == {
        "train": True,
        "val": True,
        "test": False,
    }
    failed = [r for r in report["tables"]["test"]["results"] if not r["success"]]
    assert [
        (r["expectation"], r["column"], r["sample_values"], r["sample_rows"]) for r in failed
    ] == [("expect_column_values_to_be_between", "bill_length_mm", [5000.0], [line])]


def test_stage_usage_error_is_one_line(good: Path):
    res = run(good, "python", "-m", "stages", "prepare", "images", check=False)
    assert (
        res.returncode == 1
        and res.stderr.startswith("error: usage:")
        and "Traceback" not in res.stderr
    )
