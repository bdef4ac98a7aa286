"""The server under load: 50 concurrent clients, 2,000 requests over the three tasks,
on 127.0.0.1 only, bounded in count and time."""
from __future__ import annotations

import json

import pytest

from conftest import run

pytestmark = pytest.mark.slow


def test_two_thousand_requests_no_errors_flat_memory(server, served_repo):
    out = served_repo / "metrics/load.json"
    res = run(served_repo, "python", "-m", "tools.loadtest", server, "--clients", "50", "--requests", "2000",
              "--out", str(out), check=False, timeout=300)
    result = json.loads(out.read_text())
    assert res.returncode == 0 and result["errors"] == 0, result["error_samples"]
    assert {t: s["n"] for t, s in result["latency"].items()} == {"tabular": 1000, "image": 600, "detect": 400}
    for stats in result["latency"].values():
        assert 0 < stats["p50_ms"] <= stats["p99_ms"]
    # Resident memory after warm-up (thread pool, arenas) stays flat: the last sample is
    # within 40 MB of the first one taken under load (a leak of even 20 kB a request
    # would add 40 MB over 2,000).
    assert result["rss_growth_after_warmup_mb"] < 40, result["rss_mb"]
