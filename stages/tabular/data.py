"""Tabular data, torch-free: reading any CSV, typing its columns, and the feature
preprocessing that training, export parity, `infer` and the app all share.

Rows keep their CSV line number as the DataFrame index (header = line 1), so every
error and every validation failure can point at the line a person would open.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages.core.common import StageError
from stages.core.inference import softmax

TASK_KINDS = ("classification", "regression")
# A column of strings in which at least this share parse as numbers is a numeric column
# with bad cells, not a categorical one.
NUMERIC_SHARE = 0.9


def sniff_delimiter(path: Path) -> str:
    with open(path, newline="", errors="replace") as f:
        sample = f.read(64 * 1024)
    if not sample.strip():
        raise StageError(f"{path}: the file is empty")
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","  # one column, or nothing to tell: pandas' default


def read_csv(path: str | Path, chunksize: int = 250_000) -> pd.DataFrame:
    """Read a CSV with a sniffed delimiter, in chunks so a large file never needs a second
    full-size copy of raw text in memory; index = CSV line number."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise StageError(f"{path}: the file is empty")
    sep = sniff_delimiter(path)
    try:
        chunks = list(pd.read_csv(path, sep=sep, chunksize=chunksize, skipinitialspace=True))
    except pd.errors.EmptyDataError:
        raise StageError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not a readable CSV ({str(e).strip()})") from None
    df = pd.concat(chunks) if chunks else pd.DataFrame()
    if df.empty:
        raise StageError(f"{path}: no data rows (only a header)")
    df.index = pd.RangeIndex(2, 2 + len(df), name="line")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _bad_numbers(values: pd.Series, numbers: pd.Series) -> pd.Series:
    return values[values.notna() & numbers.isna()]


def describe_cells(bad: pd.Series, limit: int = 5) -> str:
    shown = ", ".join(f"line {i}: {v!r}" for i, v in bad.head(limit).items())
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return shown + more


def normalise_columns(df: pd.DataFrame, source: str, max_categories: int) -> tuple[pd.DataFrame, dict]:
    """Numbers become float64, everything else stripped strings; returns the frame and
    {column: "numeric" | "categorical"}. Mostly-numeric columns with stray strings are an error."""
    out, kinds = {}, {}
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_bool_dtype(s):
            s = s.astype("string")
        if pd.api.types.is_numeric_dtype(s):
            out[col], kinds[col] = s.astype("float64"), "numeric"
            continue
        text = s.astype("string").str.strip().replace("", pd.NA)
        numbers = pd.to_numeric(text, errors="coerce")
        present = int(text.notna().sum())
        parsed = int(numbers.notna().sum())
        if present and parsed == present:
            out[col], kinds[col] = numbers.astype("float64"), "numeric"
        elif present and parsed >= NUMERIC_SHARE * present:
            bad = _bad_numbers(text, numbers)
            raise StageError(f"{source}: column {col!r} is numeric but has text in "
                             f"{len(bad)} rows ({describe_cells(bad)})")
        else:
            n_unique = text.nunique()
            if n_unique > max_categories:
                raise StageError(f"{source}: column {col!r} has {n_unique} distinct text values, more than "
                                 f"tabular.data.max_categories={max_categories}; if it is an id or free text, "
                                 "list it in tabular.data.drop_columns")
            out[col], kinds[col] = text.astype("str"), "categorical"
    frame = pd.DataFrame(out, index=df.index)
    return frame, kinds


def check_target(df: pd.DataFrame, target: str, task: str, source: str) -> None:
    if task not in TASK_KINDS:
        raise StageError(f"tabular.data.task is {task!r}; choose one of: {', '.join(TASK_KINDS)}")
    if target not in df.columns:
        raise StageError(f"{source}: target column {target!r} not found; columns are: {', '.join(df.columns)}")
    missing = df[target].isna()
    if missing.any():
        lines = ", ".join(str(i) for i in df.index[missing][:5])
        raise StageError(f"{source}: target {target!r} is empty in {int(missing.sum())} rows (lines {lines}); "
                         "fill or remove those rows")
    if task == "classification":
        classes = df[target].astype(str).unique()
        if len(classes) < 2:
            raise StageError(f"{source}: target {target!r} has one class ({classes[0]!r}); "
                             "classification needs at least two")
    elif not pd.api.types.is_numeric_dtype(df[target]):
        raise StageError(f"{source}: regression target {target!r} is not numeric")


@dataclass
class Preprocessor:
    """Median-impute and standardise numbers; one-hot categories (missing = all zeros).

    Fitted on the training split only; stored as plain JSON in the model card so that
    serving needs neither torch nor pickle.
    """

    numeric: list[str]
    categorical: list[str]
    medians: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def fit(cls, df: pd.DataFrame, kinds: dict[str, str]) -> "Preprocessor":
        numeric = [c for c, k in kinds.items() if k == "numeric"]
        categorical = [c for c, k in kinds.items() if k == "categorical"]
        p = cls(numeric, categorical)
        for c in numeric:
            col = df[c].astype("float64")
            median = float(col.median()) if col.notna().any() else 0.0
            filled = col.fillna(median)
            std = float(filled.std(ddof=0))
            p.medians.append(median)
            p.means.append(float(filled.mean()))
            p.stds.append(std if std > 0 and math.isfinite(std) else 1.0)
        p.categories = {c: sorted(df[c].dropna().astype(str).unique().tolist()) for c in categorical}
        return p

    @property
    def columns(self) -> list[str]:
        return self.numeric + self.categorical

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(v) for v in self.categories.values())

    def feature_names(self) -> list[str]:
        return self.numeric + [f"{c}={v}" for c in self.categorical for v in self.categories[c]]

    def transform(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise StageError(f"{source}: missing feature columns: {', '.join(missing)}")
        parts = []
        # Few pandas calls per column: on the one-row requests of the app, pandas' fixed cost
        # per call was most of the time (about 1.5 ms of 1.7 ms per row; `make bench`).
        if self.numeric:
            x = df[self.numeric]
            if not all(pd.api.types.is_numeric_dtype(t) for t in x.dtypes):  # to_numeric keeps numbers as they are
                x = x.apply(pd.to_numeric, errors="coerce")
            x = x.to_numpy(dtype="float64")
            x = np.where(np.isnan(x), np.asarray(self.medians), x)
            parts.append((x - np.asarray(self.means)) / np.asarray(self.stds))
        for c in self.categorical:
            known = self.categories[c]
            codes = pd.Index(known).get_indexer(df[c].to_numpy(dtype=object))  # as pd.Categorical codes them
            if (codes[df[c].notna().to_numpy()] < 0).any():  # a value that is not a known category
                values = df[c].astype(object).where(df[c].notna(), None)
                unseen = values[values.notna() & ~values.astype(str).isin(known)]
                if len(unseen):
                    raise StageError(f"{source}: column {c!r} has categories not seen in training "
                                     f"({describe_cells(unseen)}); known: {', '.join(known)}")
            onehot = np.zeros((len(df), len(known)))
            rows = np.flatnonzero(codes >= 0)
            onehot[rows, codes[rows]] = 1.0
            parts.append(onehot)
        return np.concatenate(parts, axis=1).astype(np.float32) if parts else np.zeros((len(df), 0), np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessor":
        return cls(**d)


def decode_outputs(outputs: np.ndarray, card: dict) -> pd.DataFrame:
    """Model outputs → a predictions table: class and per-class probabilities, or the value."""
    if card["kind"] == "classification":
        probs = softmax(outputs.astype("float64"))
        classes = card["classes"]
        table = pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])
        table.insert(0, "prediction", np.asarray(classes, dtype=object)[probs.argmax(axis=1)])
        table.insert(1, "probability", probs.max(axis=1))
        return table
    scale = card["target_scaling"]
    return pd.DataFrame({"prediction": outputs[:, 0].astype("float64") * scale["std"] + scale["mean"]})


def read_features(path: str | Path, features: list[dict]) -> pd.DataFrame:
    """Read a CSV or parquet to predict on and type its feature columns as in training.
    Extra columns are kept (and ignored by the preprocessor)."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.is_file():
            raise StageError(f"{path}: no such file")
        df = pd.read_parquet(path)
    else:
        df = read_csv(path)
    return type_features(df, features, str(path))


def type_features(df: pd.DataFrame, features: list[dict], source: str) -> pd.DataFrame:
    """Numbers that don't parse are an error naming the rows; missing feature columns
    are an error. Used by `infer` (files) and the app (JSON rows, uploads) alike."""
    missing = [f["name"] for f in features if f["name"] not in df.columns]
    if missing:
        raise StageError(f"{source}: missing feature columns: {', '.join(missing)}")
    if df.empty:
        raise StageError(f"{source}: no rows to predict")
    df = df.copy()
    for f in features:
        col = f["name"]
        if f["type"] == "numeric":
            if pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
                df[col] = df[col].astype("float64")
                continue
            text = df[col].astype("string").str.strip().replace("", pd.NA)
            numbers = pd.to_numeric(text, errors="coerce")
            bad = _bad_numbers(text, numbers)
            if len(bad):
                raise StageError(f"{source}: column {col!r} must be numeric but has text in {len(bad)} rows "
                                 f"({describe_cells(bad)})")
            df[col] = numbers.astype("float64")
        else:
            df[col] = df[col].astype("string").str.strip().replace("", pd.NA).astype("str")
    return df
