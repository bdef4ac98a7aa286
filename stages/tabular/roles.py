"""Column roles and the task, decided by the rules in docs/tabular.md ("Column roles").

Both engines call `decide` with their whole-table column stats (data.ColumnStats) and a
sample of the CSV's first rows (read_sample): counts come from the whole table, what needs
values (date formats, words per value, a row number's shape, leaks) from the sample, so
prepare stays one streaming pass on tables of any size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd

from stages.core.cli import StageError, log
from stages.core.schema import Role, TabularData, TabularTask
from stages.tabular.data import NULLS, NUMERIC_SHARE, ColumnStats, csv_header, describe_cells
from stages.tabular.encoders import detect_date_format

# the roles a column keeps (tabular.data.roles also allows `drop`)
KEPT: tuple[str, ...] = tuple(r for r in get_args(Role) if r != "drop")
SAMPLE_ROWS = 10_000
CLASS_MAX = 20  # an integer target with at most this many values is a classification
ID_NAME = re.compile(
    r"^(rownames|unnamed: ?\d+|id|index|row|rowid|row_id|.*[_ ]id|.*Id|.*ID|)$", re.I
)
BOOLEANS = {"yes", "no", "y", "n", "true", "false", "t", "f"}
NEAR_UNIQUE = 0.99  # strings unique on this share of rows (and not prose) are ids
TEXT_WORDS = 3  # values averaging this many words, and mostly distinct, are text
LEAK = 0.99
FEW_VALUES = 10  # a column of numbers with a few words and at most this many values is a category


@dataclass
class Plan:
    task: str
    task_why: str
    roles: list[dict] = field(default_factory=list)  # {column, role, why, example}
    types: dict[str, str] = field(
        default_factory=dict
    )  # kept columns: numeric|categorical|datetime|text
    formats: dict[str, str] = field(default_factory=dict)  # datetime columns' formats
    leaks: list[str] = field(default_factory=list)
    words_missing: list[str] = field(default_factory=list)  # numeric columns: words → missing


def read_sample(path, sep: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The CSV's first rows as stripped text, missing cells NaN (the typing rules' NULLS)."""
    df = pd.read_csv(
        path, sep=sep, nrows=SAMPLE_ROWS, dtype=str, keep_default_na=False, skipinitialspace=True
    )
    header = [h.strip() for h in csv_header(Path(path), sep)]
    # The header as the streaming reader names it: pandas calls an empty one "Unnamed: 0".
    df.columns = header if len(header) == len(df.columns) else [str(c).strip() for c in df.columns]
    df = df.apply(lambda s: s.str.strip()).replace(NULLS, np.nan)
    return df[columns] if columns is not None else df


def infer_task(task: TabularTask, stats: ColumnStats, sample: pd.Series) -> tuple[str, str]:
    if task != "auto":
        return task, "set in tabular.data.task"
    if stats.bad:
        return "classification", "the target holds text"
    values = pd.to_numeric(sample.dropna(), errors="coerce")
    integers = bool(len(values)) and bool((values == values.round()).all())
    if integers and stats.counted_all and stats.distinct <= CLASS_MAX:
        return "classification", f"integer target with {stats.distinct} values (<= {CLASS_MAX})"
    return "regression", "numeric target" + (" with many values" if integers else "")


def decide(
    stats: dict[str, ColumnStats], sample: pd.DataFrame, p: TabularData, source: str
) -> Plan:
    """The task and each column's role; the first user error in the order a person fixes them."""
    target = p.target
    if target not in stats:
        raise StageError(
            f"{source}: target column {target!r} not found; columns are: {', '.join(stats)}"
        )
    overrides = dict(p.roles)  # the schema allows each value
    unknown = [c for c in overrides if c not in stats]
    if unknown:
        log(f"warning: tabular.data.roles names columns not in {source}: {', '.join(unknown)}")
    t = stats[target]
    task, why = infer_task(p.task, t, sample[target])
    if task == "regression" and t.bad:
        raise StageError(f"{source}: regression target {target!r} is not numeric")
    plan = Plan(task, why)
    plan.types[target] = "numeric" if task == "regression" else "categorical"
    for col, s in stats.items():
        role, reason = role_of(col, s, sample[col], plan, overrides, p, source)
        add_role(plan, col, role, reason, sample[col], target)
    plan.types = {c: plan.types[c] for c in stats if c in plan.types}  # CSV order
    plan.leaks = leaks(sample, plan, target)
    for r in plan.roles:
        if r["column"] in plan.leaks:
            r["why"] += "; possible leak: alone it predicts the target almost perfectly"
    return plan


def role_of(
    col: str,
    s: ColumnStats,
    sample: pd.Series,
    plan: Plan,
    overrides: dict,
    p: TabularData,
    source: str,
) -> tuple[str, str]:
    """(role, why) of one column: the target's, an override's, or the rules'. Records a date
    column's format and a numeric column's words-read-as-missing in the plan."""
    if col == p.target:
        return ("numeric" if plan.task == "regression" else "categorical"), "target"
    if col in overrides:
        role, reason = overrides[col], "tabular.data.roles"
        if role == "datetime":
            plan.formats[col] = _format(sample) or _no_dates(col, source)
    else:
        role, reason = column_role(col, s, sample, p.max_categories, source)
        if role == "datetime":
            plan.formats[col] = _format(sample)
        if role == "numeric" and s.bad:
            plan.words_missing.append(col)
    if role in ("categorical", "boolean") and not s.counted_all:
        raise StageError(
            f"{source}: column {col!r} has more than {s.distinct - 1} values and cannot be "
            "categorical; set its role to text in tabular.data.roles"
        )
    return role, reason


def add_role(plan: Plan, col: str, role: str, reason: str, sample: pd.Series, target: str):
    """The column's line in the roles table, and its type when the model uses it."""
    example = sample.dropna()
    plan.roles.append(
        {
            "column": col,
            "role": role,
            "why": reason,
            "example": None if example.empty else str(example.iloc[0])[:40],
        }
    )
    if role in KEPT and col != target:
        plan.types[col] = "categorical" if role == "boolean" else role


def _format(values: pd.Series) -> str | None:
    return detect_date_format(values.dropna().drop_duplicates().head(200).tolist())


def _no_dates(col: str, source: str):
    raise StageError(f"{source}: column {col!r} is set to datetime but its values are not dates")


def column_role(
    col: str, s: ColumnStats, sample: pd.Series, max_categories: int, source: str
) -> tuple[str, str]:
    """(role, why) of one feature column: the rules of docs/tabular.md, in order."""
    values = sample.dropna()
    if not s.present:
        return "drop", "all missing"
    if s.counted_all and s.distinct <= 1:
        return "drop", "constant"
    unique = len(values) > 0 and values.nunique() == len(values) and len(values) == len(sample)
    if (
        ID_NAME.match(col)
        and unique
        and (not s.bad or not s.counted_all or s.distinct == s.present)
    ):
        return "id", "id-like name, unique values"
    if not s.bad:
        if unique and len(values) >= 10:
            x = pd.to_numeric(values)
            if (x == x.round()).all() and x.max() - x.min() + 1 == len(x):
                return "id", "unique contiguous integers: a row number"
        return "numeric", "numbers"
    if s.present - s.bad >= NUMERIC_SHARE * s.present:
        return mostly_numbers(s)
    lowered = set(values.str.lower())
    if lowered and lowered <= BOOLEANS and s.distinct <= 2:
        return "boolean", "yes/no values"
    if _format(sample):
        return "datetime", f"dates ({_format(sample)})"
    words = values.str.split().str.len().mean() if len(values) else 0
    distinct_share = values.nunique() / max(1, len(values))
    if distinct_share >= NEAR_UNIQUE and len(values) >= 20 and words < TEXT_WORDS:
        return "id", f"strings unique on {distinct_share:.0%} of rows, not prose"
    if not s.counted_all or s.distinct > max_categories:
        n = s.distinct if s.counted_all else f"more than {s.distinct - 1}"
        return "text", f"{n} distinct strings (> max_categories {max_categories})"
    if words >= TEXT_WORDS and distinct_share > 0.5:
        return "text", f"{words:.1f} words per value, mostly distinct"
    return "categorical", f"{s.distinct} distinct strings"


def mostly_numbers(s: ColumnStats) -> tuple[str, str]:
    """A column of numbers with a few words (an engine type among cylinder counts): as skrub
    and AutoGluon would, it runs: a category when its values are few, else numbers with the
    words read as missing (serving then warns on such a cell, as on any unseen value)."""
    cells = pd.Series([v for _, v in s.bad_cells], index=[i for i, _ in s.bad_cells])
    words = f"text in {s.bad} rows ({describe_cells(cells, limit=2, count=s.bad)})"
    if s.counted_all and s.distinct <= FEW_VALUES:
        return "categorical", f"{s.distinct} distinct values, mostly numbers; {words}"
    return "numeric", f"numbers; {words} read as missing"


def leaks(sample: pd.DataFrame, plan: Plan, target: str) -> list[str]:
    """Features that alone predict the target almost perfectly on the sample."""
    y = sample[target]
    keep = y.notna()
    if keep.sum() < 30:
        return []
    y = y[keep]
    out = []
    for col, col_type in plan.types.items():
        if col == target or col_type not in ("numeric", "categorical"):
            continue
        x = sample.loc[keep, col]
        if plan.task == "regression" and col_type == "numeric":
            xs = pd.to_numeric(x, errors="coerce")
            ok = xs.notna()
            if ok.sum() >= 30 and xs[ok].std() > 0:
                score = abs(np.corrcoef(xs[ok], pd.to_numeric(y[ok]))[0, 1])
                if score >= LEAK:
                    out.append(col)
        elif (
            plan.task == "classification"
            and col_type == "categorical"
            and x.nunique() <= len(x) / 5
        ):
            purity = pd.crosstab(x.fillna(""), y).max(axis=1).sum() / len(y)
            if purity >= LEAK and y.nunique() > 1:
                out.append(col)
    for col in out:
        log(f"warning: column {col!r} alone predicts the target almost perfectly: a possible leak")
    return out


def table(plan: Plan) -> str:
    """The roles as a text table, printed on every run."""
    rows = [("column", "role", "why", "example")] + [
        (r["column"], r["role"], r["why"], "" if r["example"] is None else r["example"])
        for r in plan.roles
    ]
    widths = [min(40, max(len(str(r[i])) for r in rows)) for i in range(3)]
    return "\n".join(
        "  ".join(str(v)[:40].ljust(w) for v, w in zip(r[:3], widths, strict=False)) + "  " + r[3]
        for r in rows
    )
