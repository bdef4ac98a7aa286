"""prepare's pure core: reading any CSV, typing columns, splitting, preprocessing."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from stages.core.common import StageError
from stages.core.splits import split
from stages.tabular.data import Preprocessor, check_target, decode_outputs, normalise_columns, read_csv, read_features

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


def test_normalise_types_numbers_and_text():
    df, kinds = normalise_columns(read_csv(PENGUINS), "penguins.csv", max_categories=50)
    assert kinds["bill_length_mm"] == "numeric" and kinds["island"] == "categorical"
    assert df["year"].dtype == "float64"
    assert df["sex"].isna().sum() == 11  # 'NA' cells stay missing, not the string 'nan'


def test_numbers_stored_as_text_become_numeric():
    raw = pd.DataFrame({"x": [" 1", "2.5", None, "4 "], "c": ["a", "b", "a", "b"]}, index=[2, 3, 4, 5])
    df, kinds = normalise_columns(raw, "t.csv", 50)
    assert kinds == {"x": "numeric", "c": "categorical"}
    assert df["x"].tolist()[:2] == [1.0, 2.5]


def test_text_in_a_numeric_column_names_the_line():
    raw = pd.DataFrame({"x": [str(i) for i in range(20)]}, index=range(2, 22))
    raw.loc[7, "x"] = "abc"
    with pytest.raises(StageError, match=r"column 'x' is numeric but has text in 1 rows \(line 7: 'abc'\)"):
        normalise_columns(raw, "t.csv", 50)


def test_too_many_categories_is_an_error():
    raw = pd.DataFrame({"id": [f"u{i}" for i in range(60)]})
    with pytest.raises(StageError, match="drop_columns"):
        normalise_columns(raw, "t.csv", 50)


def test_split_is_stratified_and_fixed_by_seed():
    df, _ = normalise_columns(read_csv(PENGUINS), "p", 50)
    a = split(df, "species", "classification", 0.15, 0.2, seed=1)
    b = split(df, "species", "classification", 0.15, 0.2, seed=1)
    c = split(df, "species", "classification", 0.15, 0.2, seed=2)
    assert all(a[k].index.equals(b[k].index) for k in a)
    assert not a["test"].index.equals(c["test"].index)
    assert sum(len(v) for v in a.values()) == len(df)
    assert not set(a["train"].index) & set(a["test"].index)
    overall = df["species"].value_counts(normalize=True)
    for part in a.values():
        share = part["species"].value_counts(normalize=True)
        assert (share - overall).abs().max() < 0.05


def test_check_target_errors():
    df = pd.DataFrame({"y": ["a", "a"], "x": [1.0, 2.0]})
    with pytest.raises(StageError, match="one class"):
        check_target(df, "y", "classification", "t.csv")
    with pytest.raises(StageError, match="target column 'z' not found"):
        check_target(df, "z", "classification", "t.csv")
    with pytest.raises(StageError, match="not numeric"):
        check_target(df, "y", "regression", "t.csv")


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


def test_preprocessor_rejects_unseen_categories():
    p = Preprocessor.fit(pd.DataFrame({"c": ["a", "b"]}), {"c": "categorical"})
    with pytest.raises(StageError, match=r"column 'c' has categories not seen in training \(line 3: 'zz'\)"):
        p.transform(pd.DataFrame({"c": ["a", "zz"]}, index=[2, 3]), "new.csv")


def test_read_features_types_columns_as_in_training(tmp_path):
    path = tmp_path / "new.csv"
    path.write_text("n,c,extra\n1,a,x\n,b,y\n")
    features = [{"name": "n", "type": "numeric"}, {"name": "c", "type": "categorical"}]
    df = read_features(path, features)
    assert df["n"].dtype == "float64" and np.isnan(df["n"].iloc[1])
    path.write_text("n,c\n1,a\noops,b\n")
    with pytest.raises(StageError, match=r"'n' must be numeric but has text in 1 rows \(line 3: 'oops'\)"):
        read_features(path, features)


def test_decode_outputs_classification_and_regression():
    card = {"kind": "classification", "classes": ["x", "y"]}
    table = decode_outputs(np.array([[2.0, 0.0], [0.0, 3.0]], np.float32), card)
    assert table["prediction"].tolist() == ["x", "y"]
    np.testing.assert_allclose(table[["p_x", "p_y"]].sum(axis=1), 1.0)
    card = {"kind": "regression", "target_scaling": {"mean": 10.0, "std": 2.0}}
    assert decode_outputs(np.array([[1.0], [-0.5]], np.float32), card)["prediction"].tolist() == [12.0, 9.0]
