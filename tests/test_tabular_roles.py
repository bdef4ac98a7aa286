"""Column roles and the inferred task (stages/tabular/roles.py) on small real tables and
synthetic ones that isolate one rule each; the text encoder against scikit-learn."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import params_with

from stages.core.documents import Columns
from stages.tabular import prepare
from stages.tabular.data import Preprocessor, read_split
from stages.tabular.encoders import TextEncoder, fit_text
from stages.tabular.validate import merge_suite

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "tabular"


def run_prepare(tmp_path: Path, csv: Path, target: str, **data) -> tuple[Columns, dict]:
    params = params_with(
        {"tabular.data.source": str(csv), "tabular.data.target": target}
        | {f"tabular.data.{k}": v for k, v in data.items()}
    )
    out = tmp_path / "prepared"
    schema = prepare.run(params, str(out))
    roles = {c["column"]: c["role"] for c in schema.columns}
    return schema, roles


def write(tmp_path: Path, df: pd.DataFrame) -> Path:
    path = tmp_path / "table.csv"
    df.to_csv(path, index=False)
    return path


def test_mtcars_regression_and_rownames_dropped(tmp_path):
    schema, roles = run_prepare(tmp_path, FIXTURES / "mtcars.csv", "mpg")
    assert schema.task == "regression"
    assert roles["rownames"] == "id"
    assert "rownames" not in [f.name for f in schema.features]
    assert min(schema.rows.values()) >= 5  # 32 rows: val and test never empty


def test_seattle_dates_and_inferred_classification(tmp_path):
    schema, roles = run_prepare(tmp_path, FIXTURES / "seattle-weather-120.csv", "weather")
    assert schema.task == "classification"
    assert roles["date"] == "datetime"
    (date,) = [f for f in schema.features if f.name == "date"]
    assert date.dump() == {"name": "date", "type": "datetime", "format": "%Y/%m/%d"}
    train = read_split(tmp_path / "prepared" / "train.parquet")
    assert train["date"].iloc[0].startswith("2012/")  # kept as the user wrote it
    pre = Preprocessor.fit(train, {"date": "datetime"}, {"date": "%Y/%m/%d"})
    assert pre.feature_names() == [f"date.{p}" for p in ("year", "month", "day", "weekday")] + [
        "date.elapsed_days"
    ]
    # A date that does not parse is missing (issue 37), and said by screen.
    odd = pd.DataFrame({"date": ["2012/01/01", "soon"]}, index=[6, 7])
    assert pre.screen(odd)[1][1] == ["date = 'soon' is not a date like '%Y/%m/%d'; read as missing"]
    assert np.isfinite(pre.transform(odd)).all()


def test_row_number_with_a_neutral_name_is_dropped(tmp_path):
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "n": np.arange(1, 201),  # a row number, not called id
            "x": rng.normal(size=200),
            "y": rng.normal(size=200),
        }
    )
    schema, roles = run_prepare(tmp_path, write(tmp_path, df), "y")
    assert roles["n"] == "id" and roles["x"] == "numeric"
    assert [f.name for f in schema.features] == ["x"]


def test_name_column_with_1000_values_is_text(tmp_path):
    rng = np.random.default_rng(0)
    first = [f"Name{i}" for i in range(100)]
    last = [f"Surname{j}" for j in range(10)]
    names = [f"{f} {s}" for f in first for s in last]  # 1,000 distinct two-word names
    df = pd.DataFrame(
        {
            "name": rng.choice(names, 3000),
            "grade": rng.choice(["a", "b", "c"], 3000),
            "count": rng.integers(0, 3, 3000),  # few integers: a classification
        }
    )
    schema, roles = run_prepare(tmp_path, write(tmp_path, df), "count")
    assert schema.task == "classification" and schema.classes == ["0", "1", "2"]
    assert roles["name"] == "text" and roles["grade"] == "categorical"
    train = read_split(tmp_path / "prepared" / "train.parquet")
    pre = Preprocessor.fit(train, {"name": "text", "grade": "categorical"})
    assert pre.n_features == 30 + 3  # 30 SVD components, 3 one-hot levels


def test_missing_targets_dropped_and_counted(tmp_path, capfd):
    df = pd.DataFrame(
        {"x": np.arange(100) % 7, "y": [None if i % 10 == 0 else i * 0.5 for i in range(100)]}
    )
    schema, _ = run_prepare(tmp_path, write(tmp_path, df), "y")
    assert schema.dropped_rows == {"missing_target": 10}
    assert sum(schema.rows.values()) == 90
    assert "dropped 10 rows whose target 'y' is missing" in capfd.readouterr().err


def test_ids_constants_booleans_and_overrides(tmp_path):
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        {
            "customer_id": [f"C{i:05d}" for i in range(300)],
            "const": "same",
            "member": rng.choice(["Yes", "No"], 300),
            "code": [f"k{i}" for i in rng.permutation(300)],  # unique short strings
            "label": rng.choice(["p", "q"], 300),
        }
    )
    _, roles = run_prepare(tmp_path, write(tmp_path, df), "label", roles={"member": "drop"})
    assert roles == {
        "customer_id": "id",
        "const": "drop",
        "member": "drop",
        "code": "id",
        "label": "categorical",
    }


def test_text_encoder_matches_scikit_learn():
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [f"{w} street no {i}" for i, w in enumerate(["Main", "High", "Oak", "Elm"] * 20)]
    enc = fit_text(docs)
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 4), max_features=2000).fit(docs)
    svd = TruncatedSVD(n_components=len(enc["components"]), random_state=0).fit(vec.transform(docs))
    expected = svd.transform(vec.transform(docs))
    assert np.allclose(TextEncoder(enc).matrix(docs), expected, atol=1e-9)


def test_a_dropped_column_rebuilds_only_its_expectations():
    schema = Columns(
        **{
            "target": "y",
            "task": "regression",
            "classes": None,
            "source": "t.csv",
            "rows": {"train": 50, "val": 10, "test": 10},
            "features": [{"name": "a", "type": "numeric"}, {"name": "b", "type": "categorical"}],
        }
    )
    from stages.tabular.validate import suite

    profile = {
        "a": {"rows": 70, "nulls": 0, "min": 0.0, "max": 1.0, "values": None},
        "b": {"rows": 70, "nulls": 0, "min": None, "max": None, "values": ["u", "v"]},
    }
    old = suite(profile, schema, 0.5, 0.9999)
    old["expectations"][3]["kwargs"]["max_value"] = 99.0  # the user's edit of a's range
    schema2 = schema.model_copy(update={"features": schema.features[:1]})
    merged, changes = merge_suite(old, suite(profile, schema2, 0.5, 0.9999), schema2)
    assert changes == ["dropped 'b'"]
    assert not [e for e in merged["expectations"] if e["kwargs"].get("column") == "b"]
    assert merged["expectations"][0]["kwargs"]["column_set"] == ["a", "y"]
    assert [e for e in merged["expectations"] if e["kwargs"].get("max_value") == 99.0]
    assert merge_suite(merged, suite(profile, schema2, 0.5, 0.9999), schema2)[1] == []


def test_fixture_licences_recorded():
    text = (FIXTURES / "LICENSES.md").read_text()
    for f in FIXTURES.glob("*.csv"):
        assert f.name in text
    shutil.disk_usage(FIXTURES)  # the fixtures are small, checked in
