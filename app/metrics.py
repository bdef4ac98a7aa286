"""Prometheus metrics of one app: requests, errors, latency per task, input drift and warnings,
resident memory. One registry per app (tests build several); with several uvicorn workers
(PROMETHEUS_MULTIPROC_DIR set) /metrics sums the files every worker writes."""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from app.monitor import serving_metrics
from app.settings import Settings

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, models: dict, missing: dict, cfg: Settings):
        self.models, self.last_refresh = models, 0.0
        registry = self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: each writes its files
            from prometheus_client import multiprocess

            self.scrape_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.scrape_registry)
        else:
            self.scrape_registry = registry
            # Resident memory, CPU seconds, open files (one process only).
            ProcessCollector(registry=registry)
        self.memory = Gauge(
            "worker_resident_memory_bytes",
            "resident memory of the worker processes (summed)",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.drift = Gauge(
            "input_drift_psi",
            "PSI of served inputs over the last serve.drift_window values against the "
            "training data (model card reference); above input_drift_psi_threshold "
            "(serve.drift_threshold) is a shift",
            ["task", "feature"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.warned = Counter(
            "input_warnings",
            "served rows with values outside the validated range or unseen",
            ["task", "version"],
            registry=registry,
        )
        self.flagged = Counter(
            "ood_flagged",
            "served rows (images) whose prediction was flagged unlike the training data (ood)",
            ["task", "version"],
            registry=registry,
        )
        self.requests = Counter(
            "requests", "HTTP requests", ["task", "version", "status"], registry=registry
        )
        self.errors = Counter(
            "request_errors",
            "HTTP requests answered 4xx or 5xx",
            ["task", "version"],
            registry=registry,
        )
        self.latency = Histogram(
            "request_latency_seconds",
            "request latency",
            ["task", "version"],
            registry=registry,
            buckets=BUCKETS,
        )
        self.shadow_rows = Counter(
            "shadow_rows",
            "rows (images) the candidate scored in shadow",
            ["task"],
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "shadow_disagreements",
            "rows (images) where the shadow candidate's answer differs from the served model's",
            ["task"],
            registry=registry,
        )
        self.gauges = serving_metrics(registry, cfg)  # for deploy/'s alerts and dashboard
        for task in missing:
            self.gauges["ready"].labels(task).set(0)
        for task, m in models.items():
            self.adopt(task, m)

    def adopt(self, task: str, m, old=None, role: str = "served") -> None:
        """A model swapped in (old: the one it replaces): its version's series start at 0
        (rate() sees no rise from a series it never saw) and model_info names it."""
        if old is not None:
            self.report(task, old)  # what the old one counted until now
            self.gauges["info"].labels(task, old.version, role, old.card.onnx.sha256[:12]).set(0)
        self.gauges["info"].labels(task, m.version, role, m.card.onnx.sha256[:12]).set(1)
        if role == "served":
            self.gauges["ready"].labels(task).set(1)
        m.monitor.rows = self.gauges["rows"].labels(task, m.version)
        self.warned.labels(task, m.version)
        self.flagged.labels(task, m.version)
        self.errors.labels(task, m.version)
        self.shadow_rows.labels(task)
        self.shadow_disagreements.labels(task)

    def refresh(self) -> None:
        """Push this worker's drift, warning and OOD counts and memory into the metrics."""
        self.last_refresh = time.monotonic()
        self.memory.set(resident_bytes())
        for task, m in list(self.models.items()):
            for feature, value in m.monitor.drift().items():
                self.drift.labels(task, feature).set(value)
            self.report(task, m)

    def shadowed(self, task: str, rows: int, disagreements: int) -> None:
        self.shadow_rows.labels(task).inc(rows)
        self.shadow_disagreements.labels(task).inc(disagreements)

    def report(self, task: str, m) -> None:
        """The warnings and OOD flags a model's monitor counted since the last report."""
        mon = m.monitor
        new, mon.warned_reported = mon.warned - mon.warned_reported, mon.warned
        if new:
            self.warned.labels(task, m.version).inc(new)
        new, mon.flagged_reported = mon.flagged - mon.flagged_reported, mon.flagged
        if new:
            self.flagged.labels(task, m.version).inc(new)

    def observe(self, task: str, version: str, status: int, elapsed: float) -> None:
        """One request; version: the model that answered ("-": refused before one did)."""
        self.requests.labels(task, version, str(status)).inc()
        self.latency.labels(task, version).observe(elapsed)
        if status >= 400:
            self.errors.labels(task, version).inc()
        if time.monotonic() - self.last_refresh > 1:  # at most once a second per worker
            self.refresh()

    def scrape(self) -> bytes:
        self.refresh()
        return generate_latest(self.scrape_registry)
