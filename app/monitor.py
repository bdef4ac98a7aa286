"""What served inputs look like against the training data (the model card's `reference`,
written by export from the training split and the validated GX suite): per-row warnings
for values outside the validated range or never seen, drift (PSI) over a sliding window
per feature, and a sampled, size-bounded, rotating JSON-lines request log for
`python -m tools.drift`. Torch-free; one Monitor per task and worker process.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import random
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from app.settings import Settings
from stages.core.card import Card

EPS = 1e-4  # share given to an empty bin, so PSI stays finite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two share vectors: < 0.1 stable, above
    serve.drift_threshold (0.25 by default, the usual rule of thumb) shifted."""
    e, a = np.clip(expected, EPS, None), np.clip(actual, EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def feature_shares(ref: dict, values: list) -> tuple[np.ndarray, np.ndarray]:
    """(reference shares, served shares) over the reference's bins (numbers, with
    np.searchsorted side="right" as stages/core/onnx_export.py reference() binned them) or its
    categories plus one bucket for any other value. Missing values are left out."""
    if ref["type"] == "numeric":
        v = np.asarray(values, dtype="float64")  # None → NaN
        v = v[~np.isnan(v)]
        counts = np.bincount(
            np.searchsorted(ref["bins"], v, side="right"), minlength=len(ref["bins"]) + 1
        )
        return np.asarray(ref["shares"]), counts / max(len(v), 1)
    names = list(ref["shares"])
    index = {k: i for i, k in enumerate(names)}
    counts = np.zeros(len(names) + 1)
    for x in values:
        if x is not None:
            counts[index.get(str(x), len(names))] += 1
    return np.asarray([*ref["shares"].values(), 0.0]), counts / max(counts.sum(), 1)


def value_warnings(ref: dict, row: dict) -> list[str]:
    """Sentences for the values of one row outside the validated range, not in the
    validated set, or missing where training never had a missing value."""
    out = []
    for name, r in ref.items():
        if name not in row:
            continue
        v = row[name]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            if r["null_share"] == 0 and r.get("valid") is not None:
                out.append(f"{name} is missing, and it was never missing in training")
        elif r["type"] == "numeric" and r.get("valid"):
            lo, hi = r["valid"]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                seen = f"; training had {r['min']:g} to {r['max']:g}" if "min" in r else ""
                out.append(f"{name} = {v:g} is outside the validated range {lo:g} to {hi:g}{seen}")
        elif r["type"] == "categorical" and str(v) not in (
            known := r.get("valid") or list(r["shares"])
        ):
            out.append(f"{name} = {v!r} was never seen in training (known: {', '.join(known)})")
    return out


def serving_metrics(registry, cfg: Settings) -> dict:
    """What the alert rules and the dashboard (deploy/) read besides the traffic metrics:
    the drift threshold (serve.drift_threshold, so the rule file holds no copy of it), which
    models are ready, which version each one is (set per worker as models are swapped in;
    with several workers each sets the same values, so max/min merge them), and the rows
    checked for warnings per version, the denominator of the warning and OOD shares (a
    counter each Monitor counts into)."""
    from prometheus_client import Counter, Gauge

    Gauge(
        "input_drift_psi_threshold",
        "serve.drift_threshold: input_drift_psi above it means the feature has shifted",
        registry=registry,
        multiprocess_mode="max",
    ).set(cfg.drift_threshold)
    ready = Gauge(
        "model_ready",
        "1: the task's model is loaded and served; 0: missing or broken (see /ready)",
        ["task"],
        registry=registry,
        multiprocess_mode="min",
    )
    info = Gauge(
        "model_info",
        "1 per served model (0: one served before): its version (the registry version, else "
        "the model's md5, as model_version in every answer), role (served or candidate) and "
        "ONNX sha256 prefix",
        ["task", "version", "role", "sha256"],
        registry=registry,
        multiprocess_mode="max",
    )
    rows = Counter(
        "input_rows",
        "served rows (images) checked for warnings",
        ["task", "version"],
        registry=registry,
    )
    return {"ready": ready, "info": info, "rows": rows}


class Monitor:
    def __init__(self, task: str, card: Card, cfg: Settings):
        self.task = task
        self.ref = (card.reference or {}).get("features", {})
        self.strict = cfg.strict
        window = cfg.drift_window
        self.min_rows = max(1, window // 10)  # fewer values than this say nothing yet
        self.window = {name: deque(maxlen=window) for name in self.ref}
        self.lock = threading.Lock()  # request threads append while /metrics reads
        self.sample = cfg.request_log_sample
        self.log = request_logger(task, cfg) if self.sample > 0 else None
        self.warned = self.warned_reported = (
            0  # rows with warnings; reported: already counted in /metrics
        )
        self.flagged = self.flagged_reported = 0  # predictions flagged OOD, as warned
        self.rows = None  # the input_rows_total counter, where serving_metrics() set one

    def ood(self, preds: list[dict]) -> None:
        """Count the predictions whose input was flagged unlike the training data (trust)."""
        n = sum(1 for p in preds if p.get("ood", {}).get("flagged"))
        if n:
            with self.lock:
                self.flagged += n

    def warnings(
        self, rows: list[dict], screened: list[list[str]] | None = None
    ) -> list[list[str]]:
        """Per row: the cells the model read as missing or unknown (`screened`, from
        Preprocessor.screen, the rule batch infer applies too), then this monitor's own
        warnings on the other columns (missing where training never was, outside the
        validated range)."""
        out = [value_warnings(self.ref, r) for r in rows]
        if screened is not None:
            out = [
                s + [w for w in m if w.split(" ", 1)[0] not in {x.split(" ", 1)[0] for x in s}]
                for s, m in zip(screened, out, strict=True)
            ]
        if self.rows is not None:
            self.rows.inc(len(rows))
        if any(out):
            with self.lock:
                self.warned += sum(1 for w in out if w)
        return out

    def observe(self, rows: list[dict]) -> None:
        """Add served values (a list value adds each element, e.g. detection scores) to the
        window, and log a sample of the rows."""
        with self.lock:
            for r in rows:
                for name, v in r.items():
                    if name in self.window:
                        self.window[name].extend(v if isinstance(v, list) else [v])
        if self.log:
            for r in rows:
                if random.random() < self.sample:
                    self.log.info(
                        json.dumps({"time": round(time.time(), 3), "task": self.task, "values": r})
                    )

    def drift(self) -> dict[str, float]:
        """PSI per feature over the current window (features with too few values left out)."""
        with self.lock:
            windows = {k: list(v) for k, v in self.window.items()}
        out = {}
        for name, values in windows.items():
            expected, actual = feature_shares(self.ref[name], values)
            if len(expected) > 1 and sum(1 for v in values if v is not None) >= self.min_rows:
                out[name] = psi(expected, actual)
        return out


def request_logger(task: str, cfg: Settings) -> logging.Logger:
    """JSON lines in <request_log_dir>/<task>-<pid>.jsonl, rotated at request_log_mb with
    request_log_backups old files: one file per worker process, so no two processes ever
    rotate the same file."""
    folder = Path(cfg.request_log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger(f"app.requests.{task}.{os.getpid()}.{id(cfg)}")
    log.propagate, log.level = False, logging.INFO
    if not log.handlers:
        handler = logging.handlers.RotatingFileHandler(
            folder / f"{task}-{os.getpid()}.jsonl",
            maxBytes=int(cfg.request_log_mb * 2**20),
            backupCount=cfg.request_log_backups,
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return log
