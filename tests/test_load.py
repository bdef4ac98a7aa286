"""The server under load: 50 concurrent clients, 2,000 requests over the three tasks,
on 127.0.0.1 only, bounded in count and time; with one worker process and again with
two (uvicorn factory mode, Prometheus multiprocess mode) and API keys on. Both results go to
metrics/load.json."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
import yaml
from conftest import run, serving

pytestmark = pytest.mark.slow


def load(url, repo) -> dict:
    out = repo / "metrics/load.json"
    res = run(
        repo,
        "python",
        "-m",
        "tools.loadtest",
        url,
        "--clients",
        "50",
        "--requests",
        "2000",
        "--out",
        str(out),
        check=False,
        timeout=300,
    )
    workers = json.loads(urllib.request.urlopen(f"{url}/ready", timeout=10).read())["workers"]
    result = json.loads(out.read_text())[f"workers_{workers}"]
    assert res.returncode == 0 and result["errors"] == 0, result["error_samples"]
    assert {t: s["n"] for t, s in result["latency"].items()} == {
        "tabular": 1000,
        "image": 600,
        "detect": 400,
    }
    for stats in result["latency"].values():
        assert 0 < stats["p50_ms"] <= stats["p99_ms"]
    # Resident memory after warm-up (thread pool, arenas) stays flat: the last sample is
    # within 40 MB per worker of the first one taken under load (a leak of even 20 kB a
    # request would add 40 MB over 2,000).
    assert result["rss_growth_after_warmup_mb"] < 40 * workers, result["rss_mb"]
    return result


def test_two_thousand_requests_no_errors_flat_memory(server, served_repo):
    assert load(server, served_repo)["workers"] == 1


def test_two_workers_share_the_load_and_sum_their_metrics(served_repo, monkeypatch):
    # With API keys on (tools/loadtest.py sends the first key of APP_API_KEYS).
    monkeypatch.setenv("APP_API_KEYS", "load-test-key,other-key")
    with serving(served_repo, APP_WORKERS="2") as url:
        result = load(url, served_repo)
        text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    assert result["workers"] == 2
    # Multiprocess mode: /metrics, answered by one worker, counts every worker's requests
    # (50 warm-up requests + 2,000).
    served = sum(
        float(v)
        for v in re.findall(
            r'^requests_total\{status="200",task="\w+",version="\w+"\} (\S+)$', text, re.M
        )
    )
    assert served == 2050, served
    # What deploy/'s alert rules read: one series each, however many workers set it.
    params = yaml.safe_load((served_repo / "params.yaml").read_text())["serve"]
    found = re.findall(r"^input_drift_psi_threshold (\S+)$", text, re.M)
    assert [float(v) for v in found] == [params["drift_threshold"]], found
    assert sorted(re.findall(r'^model_ready\{task="(\w+)"\} 1\.0$', text, re.M)) == [
        "detect",
        "image",
        "tabular",
    ]
    assert len(json.loads((served_repo / "metrics/load.json").read_text())) >= 2
