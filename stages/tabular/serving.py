"""The tabular serving fast path: the model card's preprocessing and output decoding
compiled once into numpy, for JSON rows (lists of dicts), with no pandas per request.

pandas' fixed cost per call was almost all of a one-row request (3.0 ms against 0.027 ms
for session.run). This does the very arithmetic of `Preprocessor.transform` and
`decode_outputs` (stages/tabular/data.py) in the same order and dtypes, so the answers are
bit-for-bit the same (tests/test_drift.py checks it on the penguins test split). Anything
it cannot take as it is (text in a number field, an unseen category, an unparseable date, a
number outside the validated range) returns None, and the caller falls back to the pandas
path, which names the problem or reads the cell as missing with a warning (Preprocessor.screen).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from stages.core.cli import StageError
from stages.core.inference import softmax
from stages.tabular.encoders import TextEncoder, date_parts

if TYPE_CHECKING:
    from stages.core.card import Card


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def as_text(v):
    """A JSON number sent for a text, date or category column, as the CSV reader would have
    read the cell: 1999 → "1999" (an integral float too: 4.0 → "4"), 2.5 → "2.5"."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return v
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return v
    return str(int(v)) if float(v).is_integer() else repr(v)


def json_rows(rows: list[dict], card: Card) -> list[dict]:
    """Rows as a client sends them, every column of the training CSV allowed → the feature
    columns only (the card's `ignored`: ids, constants, dropped columns, the target, which the
    model does not read), JSON numbers in text-like columns as text."""
    texts = {f.name for f in card.features if f.type != "numeric"}
    names = [f.name for f in card.features]
    return [{c: as_text(r.get(c)) if c in texts else r.get(c) for c in names} for r in rows]


class Rows:
    def __init__(self, card: Card):
        pre = card.preprocessing
        self.numeric, self.categorical = pre["numeric"], pre["categorical"]
        self.medians, self.means, self.stds = (
            np.asarray(pre[k], dtype="float64") for k in ("medians", "means", "stds")
        )
        self.codes = {
            c: {v: i for i, v in enumerate(pre["categories"][c])} for c in self.categorical
        }
        ranges = pre.get("ranges", {})
        self.lows = np.asarray([ranges.get(c, [-np.inf])[0] for c in self.numeric], "float64")
        self.highs = np.asarray([ranges.get(c, [0, np.inf])[1] for c in self.numeric], "float64")
        self.dates = pre.get("dates", {})
        self.texts = {c: TextEncoder(e) for c, e in pre.get("texts", {}).items()}
        self.width = len(self.medians) + sum(len(v) for v in self.codes.values())
        self.kind, self.classes, self.scaling = (
            card.kind,
            card.classes,
            card.target_scaling,
        )
        self.p_names = [f"p_{c}" for c in self.classes or []]

    def transform(self, rows: list[dict]) -> np.ndarray | None:
        """JSON rows → the model input (float32), or None when a value needs the pandas path."""
        n = len(rows)
        try:
            # None → NaN, as pandas does for a float64 column; numbers as float64.
            x = np.array([[r[c] for c in self.numeric] for r in rows], dtype="float64").reshape(
                n, len(self.numeric)
            )
        except (TypeError, ValueError):
            return None
        with np.errstate(invalid="ignore"):
            if ((x < self.lows) | (x > self.highs)).any():
                return None  # outside the validated range: the pandas path screens and warns
        extra = []
        for c, fmt in self.dates.items():  # the very per-value functions data.py calls
            values = [date_parts(r[c], fmt) for r in rows]
            if any(v is None for v in values):
                return None
            extra.append(np.array(values, dtype="float64").reshape(n, -1))
        extra += [t.matrix([r[c] for r in rows]) for c, t in self.texts.items()]
        if extra:
            x = np.concatenate([x, *extra], axis=1)
        x = np.where(np.isnan(x), self.medians, x)
        parts = [(x - self.means) / self.stds] if len(self.medians) else []
        for c in self.categorical:
            codes = self.codes[c]
            onehot = np.zeros((n, len(codes)))
            for i, r in enumerate(rows):
                v = r[c]
                if _missing(v):
                    continue
                v = str(v).strip()  # as type_features: stripped text, "" is missing
                if v:
                    if v not in codes:
                        return None
                    onehot[i, codes[v]] = 1.0
            parts.append(onehot)
        return (
            np.concatenate(parts, axis=1).astype(np.float32)
            if parts
            else np.zeros((n, 0), np.float32)
        )

    def decode(self, outputs: np.ndarray, source: str = "request") -> list[dict]:
        """Model outputs → one dict per row, as `decode_outputs` then `to_dict("records")`."""
        if not np.isfinite(outputs).all():
            raise StageError(
                f"{source}: some values are so far out of range that the model gives no finite prediction"
            )
        if self.kind != "classification":
            values = outputs[:, 0].astype("float64") * self.scaling["std"] + self.scaling["mean"]
            return [{"prediction": float(v)} for v in values]
        out = []
        for p in softmax(outputs.astype("float64")).tolist():
            best = max(range(len(p)), key=p.__getitem__)  # the first largest, as argmax
            out.append(
                {
                    "prediction": self.classes[best],
                    "probability": p[best],
                    **dict(zip(self.p_names, p, strict=False)),
                }
            )
        return out
