"""Encoders for dates and free text, torch-free and sklearn-free at serving time.

Fitting uses scikit-learn (TfidfVectorizer's vocabulary and idf, TruncatedSVD's components:
what skrub's StringEncoder does, char_wb 3-4-grams then SVD). Applying is hand-written numpy
over the numbers stored in the model card, because serving (app/, batch infer) must not need
scikit-learn or pickles, and because training, batch infer and the app's fast path must give
the same bits: all three call `TextEncoder.value` and `date_parts` on one value at a time.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import numpy as np

# Tried in this order on a sample; a column is dates when every sampled value parses with
# one of them (ISO first; month-first US dates before day-first, as pandas and skrub do).
DATE_FORMATS = (
    "%Y-%m-%d",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%d %H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S.%f",
    "%Y-%m-%dT%H:%M:%S.%f%z",
    "%Y-%m-%d %H:%M:%S.%f",
    "%Y/%m/%d",
    "%m/%d/%Y",
    "%d/%m/%Y",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%d.%m.%Y",
    "%b-%Y",
    "%b %Y",
    "%b %d %Y",
    "%d-%b-%Y",
    "%Y-%m",
    "%d %b %Y",
    "%B %d, %Y",
)
EPOCH = datetime(1970, 1, 1)
TEXT_NGRAMS = (3, 4)
TEXT_COMPONENTS = 30  # skrub's StringEncoder default
TEXT_VOCAB = 2000  # most frequent n-grams kept: bounds the card (components x vocab floats)
_SPACES = re.compile(r"\s\s+")


def parse_date(value: str, fmt: str) -> datetime | None:
    try:
        dt = datetime.strptime(value, fmt)
    except ValueError:
        return None
    if dt.tzinfo is not None:  # zoned timestamps: compared in UTC
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt


def detect_date_format(values: list[str]) -> str | None:
    """The first format that parses every value with a digit in it, or None. Values without
    a digit (".", "unknown": a missing-value marker) are left out, as long as they are under
    half; what is left must hold a digit (so "1", "2" parse as no format's date anyway)."""
    dated = [v for v in values if any(ch.isdigit() for ch in v)]
    if not dated or len(dated) * 2 < len(values):
        return None
    values = dated
    for fmt in DATE_FORMATS:
        if all(parse_date(v, fmt) is not None for v in values):
            return fmt
    return None


def date_part_names(fmt: str) -> list[str]:
    """year, month, day and weekday (when the format has a day), hour (when it has a time),
    and elapsed days since 1970 (so trends are linear in one feature)."""
    names = ["year", "month"]
    if "%d" in fmt:
        names += ["day", "weekday"]
    if "%H" in fmt:
        names.append("hour")
    return [*names, "elapsed_days"]


def date_parts(value, fmt: str) -> list[float] | None:
    """One value's date features (NaN for a missing value), or None when it is not a date."""
    n = len(date_part_names(fmt))
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        return [float("nan")] * n
    dt = parse_date(str(value).strip(), fmt)
    if dt is None:
        return None
    out = [float(dt.year), float(dt.month)]
    if "%d" in fmt:
        out += [float(dt.day), float(dt.weekday())]
    if "%H" in fmt:
        out.append(float(dt.hour))
    out.append((dt - EPOCH).total_seconds() / 86400.0)
    return out


def char_wb_ngrams(text: str, ngrams=TEXT_NGRAMS) -> list[str]:
    """scikit-learn's `char_wb` analyzer (lowercased): n-grams inside space-padded words."""
    text = _SPACES.sub(" ", text.lower())
    lo, hi = ngrams
    out = []
    for w in text.split():
        w = f" {w} "
        for n in range(lo, hi + 1):
            offset = 0
            out.append(w[offset : offset + n])
            while offset + n < len(w):
                offset += 1
                out.append(w[offset : offset + n])
            if offset == 0:  # a short word counts once
                break
    return out


def fit_text(values: list[str]) -> dict:
    """TF-IDF (char_wb n-grams, l2-normalised) then SVD, fitted on the training values; the
    card keeps the terms, idf and components. Missing values are empty strings."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [v for v in values if v] or [""]
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=TEXT_NGRAMS, max_features=TEXT_VOCAB)
    try:
        tfidf = vec.fit_transform(docs)
    except ValueError:  # no n-gram at all (empty or one-letter strings)
        return {"ngrams": list(TEXT_NGRAMS), "terms": [], "idf": [], "components": []}
    terms = [""] * len(vec.vocabulary_)
    for term, i in vec.vocabulary_.items():
        terms[i] = term
    k = min(TEXT_COMPONENTS, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    svd = TruncatedSVD(n_components=max(k, 1), random_state=0)
    components = np.eye(1, len(terms)) if k < 1 else svd.fit(tfidf).components_
    return {
        "ngrams": list(TEXT_NGRAMS),
        "terms": terms,
        "idf": vec.idf_.tolist(),
        "components": np.asarray(components).tolist(),
    }


class TextEncoder:
    """A fitted text encoder (fit_text's dict) applied in numpy, one value at a time."""

    def __init__(self, enc: dict):
        self.index = {t: i for i, t in enumerate(enc["terms"])}
        self.idf = np.asarray(enc["idf"], dtype="float64")
        self.components = np.asarray(enc["components"], dtype="float64").reshape(
            -1, len(enc["terms"])
        )
        self.ngrams = tuple(enc["ngrams"])
        self.width = self.components.shape[0]
        self.cache: dict[str, np.ndarray] = {}

    def value(self, text) -> np.ndarray:
        """tf-idf (raw counts x idf, l2-normalised, as TfidfVectorizer) projected on the SVD
        components; zeros for a missing value or one with no known n-gram."""
        if text is None or (isinstance(text, float) and text != text):
            text = ""
        text = str(text)
        hit = self.cache.get(text)
        if hit is not None:
            return hit
        counts: dict[int, int] = {}
        for g in char_wb_ngrams(text, self.ngrams):
            i = self.index.get(g)
            if i is not None:
                counts[i] = counts.get(i, 0) + 1
        out = np.zeros(self.width)
        if counts:
            idx = np.fromiter(counts, dtype=np.int64)
            w = np.fromiter(counts.values(), dtype="float64") * self.idf[idx]
            w /= np.sqrt(np.dot(w, w))
            out = self.components[:, idx] @ w
        if len(self.cache) < 100_000:
            self.cache[text] = out
        return out

    def matrix(self, values) -> np.ndarray:
        return np.array([self.value(v) for v in values], dtype="float64").reshape(
            len(values), self.width
        )
