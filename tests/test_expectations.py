"""Great Expectations suites: created from training data, run for real, readable failures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, params_with

from stages.core import gx_patches
from stages.core.expectations import for_inference, run_suite, summarise
from stages.tabular import prepare
from stages.tabular.validate import null_mostly, profile
from stages.tabular.validate import suite as tabular_suite

PENGUINS = ROOT / "data/tabular/penguins.csv"


def prepare_and_profile(out, source=PENGUINS, seed=0, confidence=0.9999):
    """prepare.run into `out`; (splits, schema, the suite made from them)."""
    params = params_with({"seed": seed, "tabular.data.source": str(source)})
    schema = prepare.run(params, out_dir=str(out))
    parts = {n: pd.read_parquet(out / f"{n}.parquet") for n in ("train", "val", "test")}
    return (
        parts,
        schema,
        tabular_suite(profile(out / "train.parquet", schema), schema, 0.5, confidence),
    )


@pytest.fixture(scope="module")
def penguins(tmp_path_factory):
    return prepare_and_profile(tmp_path_factory.mktemp("prepared"))


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
    failed = {
        (r["expectation"], r["column"]): r
        for r in report["tables"]["test"]["results"]
        if not r["success"]
    }
    between = failed[("expect_column_values_to_be_between", "bill_length_mm")]
    assert between["sample_values"] == [5000.0] and between["sample_rows"] == [int(line)]
    assert ("expect_column_values_to_be_in_set", "island") in failed
    assert ("expect_column_values_to_be_in_set", "species") in failed
    text = summarise(report, {"test": "test.parquet"})
    assert f"5000.0 (row {line})" in text and "'Atlantis'" in text and "test (test.parquet)" in text


def test_validating_by_column_gives_what_one_whole_table_validation_gives(penguins):
    """run_suite validates each column's expectations on a frame of that column only (GX
    copies the whole frame per column expectation): the results, in the suite's order, must
    be those of one plain GX validation of the whole table (GX's own methods: no memo)."""
    import great_expectations as gx

    from stages.core.expectations import _gx_frame, _result

    parts, _, suite = penguins
    bad = parts["test"].copy()
    bad["sex"] = bad["sex"].astype(object)
    bad.loc[bad.index[:4], "bill_length_mm"] = [5000.0, np.nan, -1.0, np.nan]
    bad.loc[bad.index[2:9], "island"] = "Atlantis"
    bad.loc[bad.index[1], "sex"] = 1.5
    bad.loc[bad.index[7], "species"] = "Emperor"
    fmt = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": 5,
        "return_unexpected_index_query": False,
    }
    ctx = gx.get_context(mode="ephemeral")
    batch = (
        ctx.data_sources.add_pandas("p")
        .add_dataframe_asset("t")
        .add_batch_definition_whole_dataframe("w")
    )
    whole = batch.get_batch(batch_parameters={"dataframe": _gx_frame(bad)}).validate(
        gx.ExpectationSuite(name="whole", expectations=suite["expectations"]), result_format=fmt
    )
    got = run_suite(suite, {"t": bad})["tables"]["t"]["results"]
    assert got == [_result(r) for r in whole.results]
    assert sum(not r["success"] for r in got) >= 4


def _chunks(frame: pd.DataFrame, size: int):
    for i in range(0, len(frame), size):
        yield frame.iloc[i : i + size]


def test_the_validation_worker_gives_one_validations_report(penguins, tmp_path, monkeypatch):
    """infer runs its suite in the validation worker (run_suite_aside) on a function that
    reads the input in chunks: verdicts, counts and first failing rows are those of one run
    on the whole table here. A run given up on never hands its report to the next."""
    import functools

    from stages.core.expectations import run_suite_aside

    parts, _, suite = penguins
    suite = for_inference(suite)
    bad = parts["train"].drop(columns=["species"])
    bad.loc[bad.index[[3, 150]], "bill_length_mm"] = 5000.0
    bad.loc[bad.index[160:170], "island"] = "Atlantis"
    whole = run_suite(suite, {"input": bad})
    assert not whole["success"]
    between = next(
        r
        for r in whole["tables"]["input"]["results"]
        if r["expectation"].endswith("between") and r["column"] == "bill_length_mm"
    )
    assert between["unexpected_count"] == 2 and between["sample_rows"] == [
        int(i) for i in bad.index[[3, 150]]
    ]

    abandoned = run_suite_aside(suite, {"input": functools.partial(_chunks, parts["train"], 50)})
    abandoned.cancel()
    aside = run_suite_aside(suite, {"input": functools.partial(_chunks, bad, len(bad) // 3)})
    assert aside() == whole
    assert run_suite_aside(suite, {"input": parts["test"].drop(columns=["species"])})()["success"]
    # The worker reads paths from the caller's working folder of the moment.
    monkeypatch.chdir(tmp_path)
    bad.to_parquet("bad.parquet")
    assert (
        run_suite_aside(suite, {"input": functools.partial(_read_in_chunks, "bad.parquet")})()
        == whole
    )


def _read_in_chunks(path: str):
    yield from _chunks(pd.read_parquet(path), 100)


def test_every_gx_patch_applies_to_the_gx_installed(penguins):
    """stages/core/gx_patches.py changes GX's internals for speed; on a GX release where one of
    them finds nothing to change (or GX stops going through it), this fails and names it."""
    import great_expectations as gx
    import great_expectations.execution_engine.pandas_execution_engine as engine
    from great_expectations.core.id_dict import IDDict

    parts, _, suite = penguins
    run_suite(suite, {"t": parts["test"].head(3)})  # GX's context made: the patches applied
    assert gx_patches.SKIPPED == [], f"GX {gx.__version__}: no longer applies: {gx_patches.SKIPPED}"
    assert engine.HASH_THRESHOLD == 0 and hasattr(IDDict.to_id, "gx")
    gx_patches.MEMO.clear()
    run_suite(suite, {"t": parts["test"]})
    memo = gx_patches.MEMO
    assert memo["reused"] > 5 * memo["built"] > 0, f"GX {gx.__version__} bypasses the memo: {memo}"


def test_a_gx_patch_that_finds_nothing_is_named(monkeypatch):
    """What the test above reports on a GX where IDDict.to_id changed shape: GX's own stays."""
    from great_expectations.core.id_dict import IDDict

    def to_id(self, keys=None):  # another signature
        return "x"

    monkeypatch.setattr(IDDict, "to_id", to_id)
    monkeypatch.setattr(gx_patches, "SKIPPED", [])
    gx_patches._plain_ids()
    assert gx_patches.SKIPPED == ["IDDict.to_id"] and IDDict.to_id is to_id


def test_plain_ids_are_gx_ids(penguins):
    """GX keys metrics by IDDict.to_id; the fast path for plain dicts (gx_patches.py) must
    give GX's own id for every dict a validation asks about."""
    from great_expectations.core.id_dict import IDDict

    parts, _, suite = penguins
    run_suite(suite, {"t": parts["test"].head(3)})  # the fast path in place
    fast, seen = IDDict.to_id, []

    def record(self, *args, **kwargs):
        seen.append((IDDict(self), args, kwargs))
        return fast(self, *args, **kwargs)

    IDDict.to_id = record
    try:
        run_suite(suite, {"t": parts["test"]})
    finally:
        IDDict.to_id = fast
    hashed = {fast(d) for d, a, k in seen if not a and not k and len(d) > 1}  # the fast path's kind
    assert len(hashed) >= 10
    assert all(fast(d, *a, **k) == fast.gx(d, *a, **k) for d, a, k in seen)
    odd = IDDict({"column": "x", "value_set": [1.5, float("nan")], "n": np.int64(3), "t": (1, "a")})
    assert fast(odd) == fast.gx(odd)


def test_types_are_checked(penguins):
    parts, _, suite = penguins
    bad = parts["test"].copy()
    bad["sex"] = bad["sex"].astype(object)
    bad.loc[bad.index[0], "sex"] = 1.5
    failed = [r for r in run_suite(suite, {"t": bad})["tables"]["t"]["results"] if not r["success"]]
    assert any(
        r["expectation"] == "expect_column_values_to_be_in_type_list" and r["column"] == "sex"
        for r in failed
    )


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
    failed = [
        (r["expectation"], r["column"])
        for r in report["tables"]["t"]["results"]
        if not r["success"]
    ]
    assert ("expect_column_values_to_not_be_null", "flipper_length_mm") in failed
    assert pd.isna(bad["flipper_length_mm"]).all()


def holey_penguins(path, rows: int, seed: int, share: float = 0.05):
    """`rows` penguins drawn at random, with about `share` of the feature cells emptied at random."""
    df = pd.read_csv(PENGUINS).sample(rows, random_state=seed).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    features = [c for c in df.columns if c != "species"]
    df[features] = df[features].mask(rng.random((rows, len(features))) < share)
    df.to_csv(path, index=False)
    return path


def test_a_clean_random_split_passes_its_own_suite_on_the_first_run(tmp_path):
    """The case that stopped a first run: 178 rows, ~5% of cells missing at random; val had 4
    nulls in 27 rows where train had 3.4%. prepare → suite → validate, as `dvc repro` does."""
    source = holey_penguins(tmp_path / "holey.csv", 178, seed=0)
    parts, schema, suite = prepare_and_profile(tmp_path / "out", source)
    report = run_suite(suite, parts)
    assert report["success"], summarise(report)


def test_random_splits_of_one_source_pass_their_own_suite_over_many_seeds_and_sizes(tmp_path):
    """Sampling noise alone never fails a suite: 24 sources (sizes 40 to 344, 5% holes) split
    at random, every split judged by GX on its own suite."""
    failures = []
    for i, rows in enumerate([40, 60, 90, 130, 178, 344] * 4):
        source = holey_penguins(tmp_path / f"s{i}.csv", rows, seed=i)
        parts, schema, suite = prepare_and_profile(tmp_path / f"out{i}", source, seed=i)
        report = run_suite(suite, parts)
        if not report["success"]:
            failures.append(f"{rows} rows, seed {i}: {summarise(report)}")
    assert not failures, "\n".join(failures)


def test_null_tolerance_follows_split_size_and_confidence():
    # 3.4% nulls in 115 training rows: a 27-row split may have several; a 27,000-row one barely more
    small, large = null_mostly(4, 115, 27, 0.9999), null_mostly(4000, 115_000, 27_000, 0.9999)
    assert small < 0.75 and 0.95 < large < 1 - 0.034
    assert null_mostly(4, 115, 27, 0.99) > small  # lower confidence, tighter bound
    assert null_mostly(0, 10_000, 2_000, 0.9999) > 0.99  # none in train: nearly none allowed
