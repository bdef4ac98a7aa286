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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stages.core.cli import StageError
from stages.core.documents import Columns, Feature
from stages.core.inference import softmax
from stages.core.schema import TabularData, plain
from stages.core.splits import NAMES
from stages.tabular.encoders import TextEncoder, date_part_names, date_parts

if TYPE_CHECKING:
    from stages.core.card import Card

# A column of strings in which at least this share parse as numbers is a numeric column
# with bad cells, not a categorical one.
NUMERIC_SHARE = 0.9


def open_csv(path: str | Path) -> tuple[Path, str]:
    """(path, its sniffed delimiter), or the error for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise StageError(f"{path}: the file is empty")
    return path, sniff_delimiter(path)


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
    return pd.concat(list(csv_chunks(path, chunksize)))


def csv_chunks(path: str | Path, chunksize: int = 250_000):
    """A CSV (sniffed delimiter) as pandas frames of `chunksize` rows; index = CSV line number."""
    path, sep = open_csv(path)
    line = 2
    try:
        for chunk in pd.read_csv(path, sep=sep, chunksize=chunksize, skipinitialspace=True):
            if chunk.empty:
                continue
            chunk.index = pd.RangeIndex(line, line + len(chunk), name="line")
            chunk.columns = [str(c).strip() for c in chunk.columns]
            line += len(chunk)
            yield chunk
    except pd.errors.EmptyDataError:
        raise StageError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not a readable CSV ({str(e).strip()})") from None
    if line == 2:
        raise StageError(f"{path}: no data rows (only a header)")


def _bad_numbers(values: pd.Series, numbers: pd.Series) -> pd.Series:
    return values[values.notna() & numbers.isna()]


def describe_cells(bad: pd.Series, limit: int = 5, count: int | None = None) -> str:
    """`line N: 'value'` for the first cells, and how many more (`count`: the total, when
    `bad` holds only the first few)."""
    count = len(bad) if count is None else count
    shown = ", ".join(f"line {i}: {v!r}" for i, v in bad.head(limit).items())
    more = f" and {count - limit} more" if count > limit else ""
    return shown + more


# ---- typing rules, shared by the streaming reader (prepare.py, pyarrow) and Spark ----
# Cells that are missing: pandas' default NA strings (what `read_csv` has always treated as
# missing), compared after stripping spaces.
NULLS = [
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
]
# A number, as one regular expression that RE2 (pyarrow) and Java (Spark) read alike; both
# engines then cast only matching cells, so both type every cell the same way.
NUMBER_RE = r"(?i)^[+-]?(\d+\.?\d*(e[+-]?\d+)?|\.\d+(e[+-]?\d+)?|inf|infinity|nan)$"
DISTINCT_CAP = 100_000  # distinct texts counted per column before the count stops ("more than")


@dataclass
class ColumnStats:
    """What typing a column needs, gathered over all rows by either engine."""

    present: int = 0  # non-missing cells
    bad: int = 0  # present cells that are not numbers
    bad_cells: list = field(default_factory=list)  # the first few (line, text) of them
    distinct: int = 0  # distinct texts seen
    counted_all: bool = True  # False: counting stopped, there are more than `distinct` - 1
    missing: int = 0
    missing_lines: list = field(default_factory=list)  # the first few missing lines (the target's)


def check_classes(classes: list, target: str, task: str, source: str) -> None:
    if task == "classification" and len(classes) < 2:
        raise StageError(
            f"{source}: target {target!r} has one class ({classes[0]!r}); "
            "classification needs at least two"
        )


def csv_header(path: Path, sep: str) -> list[str]:
    with open(path, newline="", errors="replace") as f:
        return next(csv.reader(f, delimiter=sep), [])


def not_readable(path: Path, sep: str, error: Exception) -> StageError:
    """The one-line error for a CSV the fast reader rejects: pandas' message when pandas
    rejects it too (it names the line: 'Expected 8 fields in line 20, saw 9'), else pyarrow's.
    pandas reads in chunks here, so a large file costs time, not memory, and only on this path."""
    rows = 0
    try:
        for chunk in pd.read_csv(
            path, sep=sep, chunksize=250_000, skipinitialspace=True, dtype=str
        ):
            rows += len(chunk)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        error = e
    except pd.errors.EmptyDataError:
        return StageError(f"{path}: the file is empty")
    else:
        if rows == 0:  # a header without a newline: pyarrow sees no complete line at all
            return StageError(f"{path}: no data rows (only a header)")
    return StageError(f"{path}: not a readable CSV ({str(error).strip().splitlines()[0]})")


BLOCK_BYTES = 16 << 20  # CSV bytes per record batch: a few hundred thousand rows


def csv_batches(path: Path, sep: str, drop: list[str] = ()):
    """Stream a CSV as (first line number, {column: stripped strings, missing cells null}) per
    record batch; every cell is read as text, so typing is ours (roles.decide), not a guess
    from the first block. Header = line 1, as in read_csv."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from stages.core.inference import physical_cores

    header = csv_header(path, sep)
    keep = [h for h in header if h.strip() not in drop]
    nulls = pa.array(NULLS)

    def clean(arr):
        # The parser already made the exact NA strings null; a cell only trimming turns into
        # one (" NA") needs the check again, so it runs only where trimming changed a byte.
        v = pc.utf8_trim_whitespace(arr)
        if pc.sum(pc.binary_length(v)) == pc.sum(pc.binary_length(arr)):
            return arr
        return pc.if_else(pc.is_in(v, value_set=nulls), pa.scalar(None, pa.string()), v)

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types={h: pa.string() for h in header},
                include_columns=keep,
                null_values=NULLS,
                strings_can_be_null=True,
            ),
        )
        line = 2
        # Columns cleaned in parallel, and the next block parsed meanwhile: arrow's parser and
        # kernels release the GIL.
        with ThreadPoolExecutor(physical_cores()) as pool:
            batches = iter(reader)
            ahead = pool.submit(next, batches, None)
            while (batch := ahead.result()) is not None:
                ahead = pool.submit(next, batches, None)
                yield (
                    line,
                    dict(
                        zip(
                            (n.strip() for n in batch.schema.names),
                            pool.map(clean, batch.columns),
                            strict=False,
                        )
                    ),
                )
                line += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise not_readable(path, sep, e) from None


def split_schema(types: dict[str, str], target: str):
    """The arrow schema of a prepared split: numbers float64, text strings, and the CSV line as
    the pandas index, so pd.read_parquet gives the frame the stages always had."""
    import pyarrow as pa

    frame = pd.DataFrame(
        {c: pd.Series(dtype="float64" if k == "numeric" else "str") for c, k in types.items()},
        index=pd.Index([], dtype="int64", name="line"),
    )
    return pa.Schema.from_pandas(frame, preserve_index=True)


def read_split(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A prepared split (a parquet file, or a folder of parts as Spark writes them) as a frame
    indexed by CSV line."""
    import pyarrow.dataset as ds

    cols = None if columns is None else [*columns, "line"]
    return _lined(ds.dataset(path, format="parquet").to_table(columns=cols))


def sample_split(path: str | Path, columns: list[str], rows: int) -> tuple[pd.DataFrame, int]:
    """The split's columns, or every k-th row of them when it has more than `rows` rows
    (k = ceil(total / rows)): a bounded, deterministic sample for summaries. Returns it and k."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    data = ds.dataset(path, format="parquet")
    step = max(1, -(-data.count_rows() // rows))
    if step == 1:
        return read_split(path, columns), 1
    batches = [
        b.take(pa.array(np.arange(0, b.num_rows, step)))
        for b in data.to_batches(columns=[*columns, "line"])
    ]
    return _lined(pa.Table.from_batches(batches)), step


def split_chunks(path: str | Path, rows: int):
    """A prepared split as frames of about `rows` rows (whole row groups), indexed by CSV line."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    batches, n = [], 0
    for batch in ds.dataset(path, format="parquet").to_batches(batch_size=rows):
        batches.append(batch)
        n += batch.num_rows
        if n >= rows:
            yield _lined(pa.Table.from_batches(batches))
            batches, n = [], 0
    if batches:
        yield _lined(pa.Table.from_batches(batches))


def _lined(table) -> pd.DataFrame:
    df = table.to_pandas()
    return df.set_index("line").sort_index() if "line" in df.columns else df


@dataclass
class Preprocessor:
    """Median-impute and standardise numbers, date parts and text components; one-hot
    categories (missing = all zeros).

    Dates (`dates`: column → format) become year, month, day, weekday, hour, elapsed days;
    text (`texts`: column → fitted encoder, stages/tabular/encoders.py) becomes TF-IDF SVD
    components. Fitted on the training split only; stored as plain JSON in the model card so
    that serving needs neither torch, scikit-learn nor pickle. `medians`, `means` and `stds`
    cover the continuous block: numeric columns, then date parts, then text components.
    """

    numeric: list[str]
    categorical: list[str]
    medians: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)
    categories: dict[str, list[str]] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)
    texts: dict[str, dict] = field(default_factory=dict)
    # Numeric columns' validated [min, max] (the GX suite's range over the training data,
    # set by export): outside it, screen() reads a number as missing. Empty: no range check.
    ranges: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit_features(cls, df: pd.DataFrame, features: list[dict]) -> Preprocessor:
        """fit() with schema.json's feature list: the one preprocessing plan (roles and date
        formats) that train, the label-issue folds and the CV folds all use."""
        return cls.fit(df, *feature_plan(features))

    @classmethod
    def fit(cls, df: pd.DataFrame, types: dict[str, str], formats: dict | None = None):
        from stages.tabular.encoders import fit_text

        p = cls(
            [c for c, k in types.items() if k == "numeric"],
            [c for c, k in types.items() if k == "categorical"],
            dates={c: (formats or {})[c] for c, k in types.items() if k == "datetime"},
        )
        p.texts = {
            c: fit_text(df[c].dropna().astype(str).tolist())
            for c, k in types.items()
            if k == "text"
        }
        for col in p.continuous(df, "training split").T:
            median = float(np.nanmedian(col)) if (~np.isnan(col)).any() else 0.0
            filled = np.where(np.isnan(col), median, col)
            std = float(filled.std())
            p.medians.append(median)
            p.means.append(float(filled.mean()))
            p.stds.append(std if std > 0 and math.isfinite(std) else 1.0)
        p.categories = {
            c: sorted(df[c].dropna().astype(str).unique().tolist()) for c in p.categorical
        }
        return p

    @property
    def columns(self) -> list[str]:
        return self.numeric + list(self.dates) + list(self.texts) + self.categorical

    @property
    def n_features(self) -> int:
        return len(self.medians) + sum(len(v) for v in self.categories.values())

    def feature_names(self) -> list[str]:
        return (
            self.numeric
            + [f"{c}.{part}" for c, f in self.dates.items() for part in date_part_names(f)]
            + [f"{c}.svd{i}" for c, e in self.texts.items() for i in range(len(e["components"]))]
            + [f"{c}={v}" for c in self.categorical for v in self.categories[c]]
        )

    def continuous(self, df: pd.DataFrame, source: str) -> np.ndarray:
        """Numbers, date parts and text components before imputation (NaN = missing)."""
        parts = []
        # Few pandas calls per column: on the one-row requests of the app, pandas' fixed cost
        # per call was most of the time (about 1.5 ms of 1.7 ms per row; `make bench`).
        if self.numeric:
            x = df[self.numeric]
            if not all(pd.api.types.is_numeric_dtype(t) for t in x.dtypes):
                x = x.apply(pd.to_numeric, errors="coerce")  # keeps numbers as they are
            parts.append(x.to_numpy(dtype="float64"))
        for c, fmt in self.dates.items():
            # A cell that is not a date like the others ("." for missing) is missing, and
            # imputed; data to predict on says so first (screen).
            width = len(date_part_names(fmt))
            rows = [date_parts(v, fmt) or [math.nan] * width for v in df[c].to_numpy(object)]
            parts.append(np.array(rows, dtype="float64").reshape(len(df), width))
        for c, enc in self.texts.items():
            parts.append(TextEncoder(enc).matrix(df[c].to_numpy(dtype=object)))
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(df), 0))

    def screen(self, df: pd.DataFrame) -> tuple[pd.DataFrame, list[list[str]]]:
        """The one rule for data the model has not seen: a category never seen in training,
        a date that does not parse, a number outside the validated range becomes a missing
        cell (imputed as train imputes: median, or no category), and its row gets a warning
        naming the column and the value. Returns (the frame to transform, warnings per row)."""
        warnings: list[list[str]] = [[] for _ in range(len(df))]
        bad_cells: dict[str, np.ndarray] = {}
        for c in self.categorical:
            v = df[c]
            bad_cells[c] = (v.notna() & ~v.astype(str).isin(self.categories[c])).to_numpy()
        for c, fmt in self.dates.items():
            bad_cells[c] = np.array([date_parts(v, fmt) is None for v in df[c].to_numpy(object)])
        for c in self.numeric:  # words in a column whose words are missing values, or out of range
            x = pd.to_numeric(df[c], errors="coerce").to_numpy("float64")
            lo, hi = self.ranges.get(c, (-np.inf, np.inf))
            with np.errstate(invalid="ignore"):
                bad_cells[c] = (x < lo) | (x > hi) | (np.isnan(x) & df[c].notna().to_numpy())
        if not any(b.any() for b in bad_cells.values()):
            return df, warnings
        df = df.copy()
        for c, bad in bad_cells.items():
            if not bad.any():
                continue
            for i in np.flatnonzero(bad):
                warnings[i].append(unseen_warning(self, c, df[c].iloc[i]))
            df[c] = df[c].astype(object).where(~bad, None)
            if c in self.numeric:
                df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        return df, warnings

    def transform(self, df: pd.DataFrame, source: str = "input") -> np.ndarray:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise StageError(f"{source}: missing feature columns: {', '.join(missing)}")
        parts = []
        if self.medians:
            x = self.continuous(df, source)
            x = np.where(np.isnan(x), np.asarray(self.medians), x)
            parts.append((x - np.asarray(self.means)) / np.asarray(self.stds))
        for c in self.categorical:
            known = self.categories[c]
            # As pd.Categorical codes them; a category training never saw is unknown (-1): all
            # zeros, as missing (data to predict on says so first: screen).
            codes = pd.Index(known).get_indexer(df[c].to_numpy(dtype=object))
            onehot = np.zeros((len(df), len(known)))
            rows = np.flatnonzero(codes >= 0)
            onehot[rows, codes[rows]] = 1.0
            parts.append(onehot)
        return (
            np.concatenate(parts, axis=1).astype(np.float32)
            if parts
            else np.zeros((len(df), 0), np.float32)
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessor:
        return cls(**d)


def feature_plan(features: list[Feature]) -> tuple[dict[str, str], dict[str, str]]:
    """The prepared columns' features → ({column: kind}, {date column: format})."""
    types = {f.name: f.type for f in features}
    return types, {f.name: f.format for f in features if f.format}


def unseen_warning(pre: Preprocessor, col: str, value) -> str:
    """One sentence for a cell screen() turned into a missing one."""
    if col in pre.numeric:
        number = pd.to_numeric(pd.Series([value]), errors="coerce")[0]
        if number != number:
            return f"{col} = {value!r} is not a number; read as missing"
        lo, hi = pre.ranges[col]
        return (
            f"{col} = {number:g} is outside the validated range {lo:g} to {hi:g}; read as missing"
        )
    if col in pre.dates:
        return f"{col} = {value!r} is not a date like {pre.dates[col]!r}; read as missing"
    return f"{col} = {value!r} was never seen in training; read as unknown"


def decode_outputs(outputs: np.ndarray, card: Card) -> pd.DataFrame:
    """Model outputs → a predictions table: class and per-class probabilities, or the value."""
    return scores_table(scores(outputs, card), card)


def scores(outputs: np.ndarray, card: Card) -> np.ndarray:
    """Model outputs → what a prediction reports, in float64: the per-class probabilities
    (rows × classes), or the value in the target's units (rows × 1)."""
    if card.kind == "classification":
        return softmax(outputs.astype("float64"))
    scale = card.target_scaling
    return outputs[:, :1].astype("float64") * scale["std"] + scale["mean"]


def scores_table(s: np.ndarray, card: Card) -> pd.DataFrame:
    """scores() as the predictions table: the class (the first most probable), its
    probability and each class's, or the value."""
    if card.kind != "classification":
        return pd.DataFrame({"prediction": s[:, 0]})
    classes = card.classes
    table = pd.DataFrame(s, columns=[f"p_{c}" for c in classes])
    table.insert(0, "prediction", np.asarray(classes, dtype=object)[s.argmax(axis=1)])
    table.insert(1, "probability", s.max(axis=1))
    return table


def read_features(path: str | Path, features: list[Feature]) -> pd.DataFrame:
    """Read a CSV or parquet to predict on and type its feature columns as in training.
    Extra columns are kept (and ignored by the preprocessor)."""
    return pd.concat(list(feature_chunks(path, features, 10**12)))


def feature_chunks(path: str | Path, features: list[Feature], rows: int):
    """read_features in frames of about `rows` rows, indexed by CSV line (a parquet file
    without one is numbered as its CSV would be: 2, 3, ...)."""
    path = Path(path)
    if path.suffix == ".parquet":
        if not path.exists():
            raise StageError(f"{path}: no such file")
        line, chunks = 2, split_chunks(path, rows)
    else:
        line, chunks = 2, csv_chunks(path, min(rows, 1_000_000))
    for df in chunks:
        if df.index.name != "line":
            df.index = pd.RangeIndex(line, line + len(df), name="line")
        line += len(df)
        yield type_features(df, features, str(path))
    if line == 2:
        raise StageError(f"{path}: no rows to predict")


def type_features(df: pd.DataFrame, features: list[Feature], source: str) -> pd.DataFrame:
    """Numbers that don't parse are an error naming the rows; missing feature columns
    are an error. Used by `infer` (files) and the app (JSON rows, uploads) alike."""
    missing = [f.name for f in features if f.name not in df.columns]
    if missing:
        raise StageError(f"{source}: missing feature columns: {', '.join(missing)}")
    if df.empty:
        raise StageError(f"{source}: no rows to predict")
    df = df.copy()
    for f in features:
        col = f.name
        if f.type == "numeric":
            if pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
                df[col] = df[col].astype("float64")
                continue
            text = df[col].astype("string").str.strip().replace("", pd.NA)
            numbers = pd.to_numeric(text, errors="coerce")
            bad = _bad_numbers(text, numbers)
            if (
                len(bad) and getattr(f, "words", None) == "missing"
            ):  # screen() warns and reads them as missing
                df[col] = text.astype(object).where(text.notna(), None)
                continue
            if len(bad):
                raise StageError(
                    f"{source}: column {col!r} must be numeric but has text in {len(bad)} rows "
                    f"({describe_cells(bad)})"
                )
            df[col] = numbers.astype("float64")
        else:
            df[col] = df[col].astype("string").str.strip().replace("", pd.NA).astype("str")
    return df


def describe(
    p: TabularData,
    seed: int,
    types: dict,
    classes: list | None,
    codes_or_counts,
    plan,
    missing_target: int,
) -> Columns:
    """The prepared columns (layout.columns): what the splits hold (both engines write the
    same one); `plan` is the roles' decision (stages/tabular/roles.py)."""
    counts = (
        np.bincount(codes_or_counts, minlength=3)
        if isinstance(codes_or_counts, np.ndarray)
        else codes_or_counts
    )
    return Columns(
        source=p.source,
        target=p.target,
        task=plan.task,
        task_why=plan.task_why,
        features=[
            Feature(
                name=c,
                type=k,
                **({"format": plan.formats[c]} if k == "datetime" else {}),
                **({"words": "missing"} if c in plan.words_missing else {}),
            )
            for c, k in types.items()
            if c != p.target
        ],
        classes=classes,
        rows={name: int(counts[i]) for i, name in enumerate(NAMES)},
        params={"seed": seed, "tabular.data": plain(p)},
        dropped_rows={"missing_target": missing_target},
        columns=plan.roles,
        warnings=[f"possible leak: {c}" for c in plan.leaks],
    )
