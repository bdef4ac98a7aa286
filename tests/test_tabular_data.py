"""prepare's pure core: reading any CSV, typing columns, splitting, preprocessing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, card_of, params_with

from stages.core.cli import StageError
from stages.core.documents import Feature
from stages.core.splits import hash_assign, row_hash
from stages.tabular import prepare
from stages.tabular.data import Preprocessor, decode_outputs, read_csv, read_features

PENGUINS = ROOT / "data/tabular/penguins.csv"


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
def test_read_csv_sniffs_the_delimiter(tmp_path, sep):
    path = tmp_path / "t.csv"
    path.write_text(f"a{sep}b{sep}c\n1{sep}x{sep}2.5\n3{sep}y{sep}\n")
    df = read_csv(path)
    assert list(df.columns) == ["a", "b", "c"]
    assert df["a"].tolist() == [1, 3]
    assert list(df.index) == [2, 3]  # CSV line numbers, header = line 1


def test_read_csv_in_chunks_equals_one_read():
    whole = read_csv(PENGUINS)
    chunked = read_csv(PENGUINS, chunksize=50)
    pd.testing.assert_frame_equal(whole, chunked)
    assert len(whole) == 344


def prepared(
    tmp_path, text: str | None = None, source=PENGUINS, **data
) -> tuple[dict, dict[str, pd.DataFrame]]:
    """prepare.run on a CSV (the penguins, or `text`); returns (schema, splits)."""
    if text is not None:
        source = tmp_path / "t.csv"
        source.write_text(text)
    split = ("val", "test", "method")
    params = params_with(
        {"tabular.data.source": str(source)}
        | {f"tabular.data.{k}": v for k, v in data.items() if k not in split}
        | {f"tabular.data.split.{k}": v for k, v in data.items() if k in split}
    )
    out = tmp_path / "out"
    schema = prepare.run(params, out_dir=str(out))
    return schema, {n: pd.read_parquet(out / f"{n}.parquet") for n in ("train", "val", "test")}


def test_prepare_types_numbers_and_text(tmp_path):
    schema, parts = prepared(tmp_path)
    types = {f.name: f.type for f in schema.features}
    assert types["bill_length_mm"] == "numeric" and types["island"] == "categorical"
    df = pd.concat(parts.values()).sort_index()
    assert df["year"].dtype == "float64"
    assert df["sex"].isna().sum() == 11  # 'NA' cells stay missing, not the string 'nan'
    assert list(df.index) == list(range(2, 346))  # every row once, named by its CSV line
    raw = read_csv(PENGUINS)
    assert df.loc[raw.index, "bill_length_mm"].equals(raw["bill_length_mm"].astype("float64"))


def test_numbers_stored_as_text_become_numeric(tmp_path):
    # even numbers: 0..39 would be a row number (an id, dropped: docs/tabular.md)
    rows = "".join(f'" {2 * i}",{"ab"[i % 2]},{"xy"[i % 2]}\n' for i in range(40))
    schema, parts = prepared(tmp_path, "x,c,y\n" + rows, target="y")
    assert {f.name: f.type for f in schema.features} == {
        "x": "numeric",
        "c": "categorical",
    }
    assert sorted(pd.concat(parts.values())["x"]) == [float(2 * i) for i in range(40)]


def test_cells_are_stripped_and_na_strings_missing_however_written(tmp_path):
    # Missing: empty, NA, quoted NA, padded NA, blanks only; stripped: padded numbers and text.
    cells = ["", "NA", '"NA"', " NA ", "   ", "null", " 2.5 ", '" x "', "7", "y "]
    rows = "".join(f"{cells[i % len(cells)]},{'ab'[i % 2]}\n" for i in range(40))
    _, parts = prepared(tmp_path, "v,t\n" + rows, target="t")
    got = pd.concat(parts.values()).sort_index()["v"]
    want = [None, None, None, None, None, None, "2.5", "x", "7", "y"]
    assert [None if pd.isna(v) else v for v in got] == [want[i % len(cells)] for i in range(40)]


def test_numbers_with_a_few_words_get_a_role_that_runs(tmp_path):
    """Issue 37: many values: numbers, the words missing (and said in the roles table); few
    values (an engine type among cylinder counts): a category."""
    rows = [f"{i * 1.5},{[4, 6, 8][i % 3]},{'ab'[i % 2]}" for i in range(40)]
    rows[5] = "abc,rotary,b"  # line 7: header = line 1
    schema, parts = prepared(tmp_path, "x,cyl,y\n" + "\n".join(rows) + "\n", target="y")
    roles = {r["column"]: r for r in schema.columns}
    assert roles["x"]["role"] == "numeric" and "line 7: 'abc'" in roles["x"]["why"]
    assert "read as missing" in roles["x"]["why"]
    assert roles["cyl"]["role"] == "categorical" and "rotary" in roles["cyl"]["why"]
    assert {"name": "x", "type": "numeric", "words": "missing"} in [
        f.dump() for f in schema.features
    ]
    whole = pd.concat(parts.values()).sort_index()
    assert np.isnan(whole.loc[7, "x"]) and whole.loc[8, "x"] == 9.0
    assert whole.loc[7, "cyl"] == "rotary" and whole.loc[2, "cyl"] == "4"


def test_screen_reads_unseen_values_as_missing_and_says_so():
    """One rule for data the model has not seen (issue 37): the cell is imputed as train
    imputes, and the row gets a warning naming the column and the value."""
    train = pd.DataFrame({"n": [1.0, 2.0, 3.0], "c": ["a", "b", "a"], "d": ["2020-01-02"] * 3})
    p = Preprocessor.fit(
        train, {"n": "numeric", "c": "categorical", "d": "datetime"}, {"d": "%Y-%m-%d"}
    )
    p.ranges = {"n": [1.0, 3.0]}  # export sets the suite's validated ranges
    new = pd.DataFrame({"n": [2.0, 99.0], "c": ["zz", "a"], "d": ["2020-01-02", "soon"]})
    clean, warnings = p.screen(new)
    assert warnings == [
        ["c = 'zz' was never seen in training; read as unknown"],
        [
            "d = 'soon' is not a date like '%Y-%m-%d'; read as missing",
            "n = 99 is outside the validated range 1 to 3; read as missing",
        ],
    ]
    x = p.transform(clean)
    missing = p.transform(pd.DataFrame({"n": [2.0, None], "c": [None, "a"], "d": [None, None]}))
    np.testing.assert_array_equal(x[0, 1:], missing[0, 1:])  # unknown category: all zeros
    np.testing.assert_array_equal(x[1], missing[1])
    assert p.screen(train)[1] == [[], [], []]


def test_too_many_categories_is_no_error(tmp_path):
    # An id column is dropped, no longer an error (roles: docs/tabular.md)
    rows = "".join(f"u{i},{'ab'[i % 2]}\n" for i in range(60))
    schema, _ = prepared(tmp_path, "id,y\n" + rows, target="y")
    assert schema.features == [] and schema.columns[0]["role"] == "id"


@pytest.mark.parametrize("method", ["hash", "sklearn"])
def test_split_is_stratified_and_fixed_by_seed(tmp_path, method):
    parts = {seed: _split(tmp_path / str(seed), seed, method) for seed in (1, 2)}
    a, c = parts[1], parts[2]
    b = _split(tmp_path / "again", 1, method)
    assert all(a[k].index.equals(b[k].index) for k in a)
    assert not a["test"].index.equals(c["test"].index)
    assert sum(len(v) for v in a.values()) == 344
    assert not set(a["train"].index) & set(a["test"].index)
    overall = pd.concat(a.values())["species"].value_counts(normalize=True)
    for part in a.values():
        share = part["species"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.05


def _split(tmp_path, seed, method):
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = params_with(
        {"seed": seed, "tabular.data.source": str(PENGUINS), "tabular.data.split.method": method}
    )
    prepare.run(params, out_dir=str(tmp_path / "out"))
    return {n: pd.read_parquet(tmp_path / "out" / f"{n}.parquet") for n in ("train", "val", "test")}


def test_hash_split_has_exact_shares_per_class_and_is_a_hash_of_seed_and_line():
    lines = np.arange(2, 10_002)
    keys = row_hash(7, lines)
    assert len(np.unique(keys)) == len(lines)  # a bijection: no ties
    groups = (lines % 3 == 0).astype(np.int64)  # two classes
    quota = [(1333, 1000), (667, 500)]
    codes = hash_assign(keys, groups, quota)
    for g, (n_test, n_val) in enumerate(quota):
        n = int((groups == g).sum())
        assert np.bincount(codes[groups == g], minlength=3).tolist() == [
            n - n_val - n_test,
            n_val,
            n_test,
        ]
    # a row's split depends on (seed, line) and its class's cut only: dropping other rows moves no one
    assert np.array_equal(row_hash(7, lines[::2]), keys[::2])


def test_rows_whose_category_train_lacks_are_moved_to_train(tmp_path):
    # categories with one row each, wherever the split draws them, end up in train
    solo = {i: f"solo{i}" for i in range(0, 60, 7)}
    rows = [f"{i},{solo.get(i, 'abc'[i % 3])},{'xy'[i % 2]}" for i in range(60)]
    schema, parts = prepared(tmp_path, "n,c,y\n" + "\n".join(rows) + "\n", target="y")
    assert set(parts["train"]["c"]) >= set(parts["val"]["c"]) | set(parts["test"]["c"])
    assert set(solo.values()) <= set(parts["train"]["c"])
    assert len(parts["val"]) and len(parts["test"])


def test_check_target_errors(tmp_path):
    with pytest.raises(StageError, match="one class"):
        prepared(tmp_path, "y,x\na,1\na,2\n", target="y")
    with pytest.raises(StageError, match="target column 'z' not found"):
        prepared(tmp_path, "y,x\na,1\nb,2\n", target="z")
    with pytest.raises(StageError, match="not numeric"):
        prepared(tmp_path, "y,x\na,1\nb,2\n", target="y", task="regression")


def test_preprocessor_fits_train_only_and_round_trips():
    train = pd.DataFrame({"n": [1.0, 2.0, np.nan, 5.0], "c": ["a", "b", "a", None]})
    p = Preprocessor.fit(train, {"n": "numeric", "c": "categorical"})
    assert p.medians == [2.0] and p.categories == {"c": ["a", "b"]}
    x = p.transform(pd.DataFrame({"n": [np.nan, 2.0], "c": [None, "b"]}))
    assert x.shape == (2, 3) and x.dtype == np.float32
    assert x[0, 1:].tolist() == [0.0, 0.0]  # missing category: all zeros
    assert x[1, 1:].tolist() == [0.0, 1.0]
    assert x[0, 0] == x[1, 0]  # NaN imputed with the median (2.0)
    again = Preprocessor.from_dict(p.to_dict())
    np.testing.assert_array_equal(again.transform(train), p.transform(train))


def test_preprocessor_reads_unseen_categories_and_bad_dates_as_missing():
    """A held-out fold or split may hold a category whose only rows are there, or a "." in
    a date column: unknown / missing, as in serving (where screen says so first)."""
    p = Preprocessor.fit(
        pd.DataFrame({"c": ["a", "b"], "d": ["1/2/2006", "."]}),
        {"c": "categorical", "d": "datetime"},
        {"d": "%m/%d/%Y"},
    )
    x = p.transform(pd.DataFrame({"c": ["a", "zz"], "d": [".", "1/2/2006"]}, index=[2, 3]))
    assert x[1, -2:].tolist() == [0.0, 0.0]  # unseen: all zeros
    assert x[0, :-2].tolist() == x[1, :-2].tolist()  # "." imputed with the median date


def test_read_features_types_columns_as_in_training(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text("n,c,extra\n1,a,x\n,b,y\n")
    features = [Feature(name="n", type="numeric"), Feature(name="c", type="categorical")]
    df = read_features(path, features)
    assert df["n"].dtype == "float64" and np.isnan(df["n"].iloc[1])
    path.write_text("n,c\n1,a\noops,b\n")
    with pytest.raises(
        StageError, match=r"'n' must be numeric but has text in 1 rows \(line 3: 'oops'\)"
    ):
        read_features(path, features)


def test_decode_outputs_classification_and_regression():
    card = card_of(kind="classification", classes=["x", "y"])
    table = decode_outputs(np.array([[2.0, 0.0], [0.0, 3.0]], np.float32), card)
    assert table["prediction"].tolist() == ["x", "y"]
    np.testing.assert_allclose(table[["p_x", "p_y"]].sum(axis=1), 1.0)
    card = card_of(kind="regression", target_scaling={"mean": 10.0, "std": 2.0})
    assert decode_outputs(np.array([[1.0], [-0.5]], np.float32), card)["prediction"].tolist() == [
        12.0,
        9.0,
    ]


def test_prepare_over_many_batches_keeps_every_cell(tmp_path, monkeypatch):
    # Small record batches: a column of numbers that turns to text late (so categorical, its
    # early batches spilled as numbers only), a category with missing cells, a number column
    # with missing cells, and an all-missing column; every cell lands where pandas reads it.
    import stages.tabular.data as data

    monkeypatch.setattr(data, "BLOCK_BYTES", 2048)
    rng = np.random.default_rng(3)
    n = 3000
    rows = ["y,late,c,x,empty"] + [
        f"{'ab'[i % 2]},{i % 3 if i < 2500 else 'zw'[i % 2]},{['p', 'q', ''][rng.integers(3)]},"
        f"{'' if i % 17 == 0 else round(float(rng.normal()), 3)},"
        for i in range(n)
    ]
    schema, parts = prepared(tmp_path, "\n".join(rows) + "\n", target="y", max_categories=10)
    types = {f.name: f.type for f in schema.features}
    assert types == {
        "late": "categorical",
        "c": "categorical",
        "x": "numeric",
    }  # the all-missing column is dropped
    got = pd.concat(parts.values()).sort_index()
    raw = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=True)
    raw.index = pd.RangeIndex(2, 2 + n, name="line")
    assert list(got.index) == list(raw.index)
    for col in ("y", "late", "c"):
        assert got[col].isna().equals(raw[col].isna()), col
        assert (got[col].dropna() == raw[col].dropna()).all(), col
    assert got["x"].isna().equals(raw["x"].isna())
    assert np.allclose(got["x"].dropna(), raw["x"].dropna().astype(float))


def test_infer_validation_stops_only_an_unusable_batch(capfd):
    """Issue 37: a value outside the set, or more missing values than `mostly` allows, is a
    logged warning with the share the batch explains; missing columns, or a column of the
    wrong type throughout, stop it; a few words in a column of numbers do not."""
    from stages.tabular.infer import judge

    def report(*results):
        return {"success": False, "tables": {"input": {"results": list(results)}}}

    def res(expectation, bad, n=1000, **kw):
        return {
            "expectation": expectation,
            "column": "c",
            "kwargs": {"column": "c", **kw},
            "success": False,
            "considered": n,
            "unexpected_count": bad,
            "sample_values": ["x"],
            "sample_rows": [5],
        }

    judge(
        report(
            res("expect_column_values_to_not_be_null", 4, mostly=0.9998),
            res("expect_column_values_to_be_in_set", 1, value_set=["a"]),
            res("expect_column_values_to_be_in_type_list", 3, type_list=["float64"]),
        ),
        "slice.csv",
        "suite.json",
    )
    err = capfd.readouterr().err
    assert "4 of 1000 rows (0.40%), more than the 0.15% a batch of 1000 rows explains" in err
    with pytest.raises(StageError, match="in_type_list on column 'c'"):
        judge(
            report(res("expect_column_values_to_be_in_type_list", 900, type_list=["float64"])),
            "x.csv",
            "suite.json",
        )
