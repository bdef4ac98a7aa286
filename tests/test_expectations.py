"""Great Expectations suites: created from training data, run for real, readable failures."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import ROOT
from stages.core.expectations import for_inference, run_suite, summarise
from stages.tabular.validate import suite as tabular_suite
from stages.core.splits import split
from stages.tabular.data import normalise_columns, read_csv


@pytest.fixture(scope="module")
def penguins():
    df, kinds = normalise_columns(read_csv(ROOT / "data/tabular/penguins.csv"), "p", 50)
    kinds.pop("species")
    schema = {"source": "penguins.csv", "target": "species", "task": "classification",
              "features": [{"name": c, "type": k} for c, k in kinds.items()],
              "classes": sorted(df["species"].unique())}
    parts = split(df, "species", "classification", 0.15, 0.2, seed=0)
    return parts, schema, tabular_suite(parts["train"], schema, range_margin=0.5, null_margin=0.05)


def test_suite_covers_columns_types_nulls_ranges_categories_and_classes(penguins):
    _, _, suite = penguins
    kinds = {(e["type"], e["kwargs"].get("column")) for e in suite["expectations"]}
    assert ("expect_table_columns_to_match_set", None) in kinds
    assert ("expect_column_values_to_be_between", "bill_length_mm") in kinds
    assert ("expect_column_values_to_be_in_set", "island") in kinds
    assert ("expect_column_values_to_be_in_set", "species") in kinds
    assert ("expect_column_values_to_be_in_type_list", "sex") in kinds
    assert ("expect_column_values_to_not_be_null", "body_mass_g") in kinds
    json.dumps(suite)  # a plain JSON file a person edits


def test_every_split_passes_and_data_docs_are_written(penguins, tmp_path):
    parts, _, suite = penguins
    report = run_suite(suite, parts, docs_dir=tmp_path / "docs")
    assert report["success"], summarise(report)
    assert set(report["tables"]) == {"train", "val", "test"}
    assert (tmp_path / "docs" / "index.html").exists()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_failures_name_expectation_column_values_and_lines(penguins):
    parts, _, suite = penguins
    bad = parts["test"].copy()
    line = bad.index[3]
    bad.loc[line, "bill_length_mm"] = 5000.0
    bad.loc[bad.index[5], "island"] = "Atlantis"
    bad.loc[bad.index[6], "species"] = "Emperor"
    report = run_suite(suite, {"test": bad})
    assert not report["success"]
    failed = {(r["expectation"], r["column"]): r for r in report["tables"]["test"]["results"] if not r["success"]}
    between = failed[("expect_column_values_to_be_between", "bill_length_mm")]
    assert between["sample_values"] == [5000.0] and between["sample_rows"] == [int(line)]
    assert ("expect_column_values_to_be_in_set", "island") in failed
    assert ("expect_column_values_to_be_in_set", "species") in failed
    text = summarise(report, {"test": "test.parquet"})
    assert f"5000.0 (row {line})" in text and "'Atlantis'" in text and "test (test.parquet)" in text


def test_types_are_checked(penguins):
    parts, _, suite = penguins
    bad = parts["test"].copy()
    bad["sex"] = bad["sex"].astype(object)
    bad.loc[bad.index[0], "sex"] = 1.5
    failed = [r for r in run_suite(suite, {"t": bad})["tables"]["t"]["results"] if not r["success"]]
    assert any(r["expectation"] == "expect_column_values_to_be_in_type_list" and r["column"] == "sex" for r in failed)


def test_inference_suite_drops_target_checks_and_allows_extra_columns(penguins):
    parts, _, suite = penguins
    infer_suite = for_inference(suite)
    assert all(e["kwargs"].get("column") != "species" for e in infer_suite["expectations"])
    rows = parts["test"].drop(columns="species").assign(id=range(len(parts["test"])))
    assert run_suite(infer_suite, {"input": rows})["success"]
    assert not run_suite(infer_suite, {"input": rows.drop(columns="island")})["success"]
    assert not run_suite(suite, {"input": rows})["success"]  # the training suite wants the target


def test_missing_values_beyond_the_allowed_share_fail(penguins):
    parts, _, suite = penguins
    bad = parts["test"].copy()
    bad["flipper_length_mm"] = float("nan")
    report = run_suite(suite, {"t": bad})
    failed = [(r["expectation"], r["column"]) for r in report["tables"]["t"]["results"] if not r["success"]]
    assert ("expect_column_values_to_not_be_null", "flipper_length_mm") in failed
    assert pd.isna(bad["flipper_length_mm"]).all()
