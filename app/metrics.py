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
            ["task"],
            registry=registry,
        )
        self.flagged = Counter(
            "ood_flagged",
            "served rows (images) whose prediction was flagged unlike the training data (ood)",
            ["task"],
            registry=registry,
        )
        self.requests = Counter("requests", "HTTP requests", ["task", "status"], registry=registry)
        self.errors = Counter(
            "request_errors", "HTTP requests answered 4xx or 5xx", ["task"], registry=registry
        )
        self.latency = Histogram(
            "request_latency_seconds",
            "request latency",
            ["task"],
            registry=registry,
            buckets=BUCKETS,
        )
        serving_metrics(registry, cfg, models, missing)  # for deploy/'s alerts and dashboard
        for task in models:  # at 0 from the start: rate() sees no rise from a series it never saw
            self.warned.labels(task)
            self.flagged.labels(task)
            self.errors.labels(task)

    def refresh(self) -> None:
        """Push this worker's drift, warning count and memory into the metrics."""
        self.last_refresh = time.monotonic()
        self.memory.set(resident_bytes())
        for task, m in self.models.items():
            for feature, value in m.monitor.drift().items():
                self.drift.labels(task, feature).set(value)
            new = m.monitor.warned - m.monitor.warned_reported
            m.monitor.warned_reported = m.monitor.warned
            if new:
                self.warned.labels(task).inc(new)
            new = m.monitor.flagged - m.monitor.flagged_reported
            m.monitor.flagged_reported = m.monitor.flagged
            if new:
                self.flagged.labels(task).inc(new)

    def observe(self, task: str, status: int, elapsed: float) -> None:
        self.requests.labels(task, str(status)).inc()
        self.latency.labels(task).observe(elapsed)
        if status >= 400:
            self.errors.labels(task).inc()
        if time.monotonic() - self.last_refresh > 1:  # at most once a second per worker
            self.refresh()

    def scrape(self) -> bytes:
        self.refresh()
        return generate_latest(self.scrape_registry)
