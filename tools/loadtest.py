"""A bounded load test against a running server (127.0.0.1 only): N concurrent clients
send a fixed number of requests spread over the three tasks, then it reports errors,
p50/p99 latency per task and the server's resident memory over the run (summed over its
worker processes).

    python -m tools.loadtest http://127.0.0.1:7860 --clients 50 --requests 2000 --out metrics/load.json

The result goes into the --out JSON under "workers_<n>" (n from the server's /ready), beside
the runs with other worker counts already there.

Inputs come from the repo: a test row, a demo digit, a demo scene (run `make run` first).
With APP_API_KEYS in the environment (as the server reads it: keys, or a file of keys), the
requests carry the first key as `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from stages.core import layout

MIX = (("tabular", 5), ("image", 3), ("detect", 2))  # requests per 10, by task


def payloads(repo: Path) -> dict:
    row = json.loads(
        pd.read_parquet(repo / "data/prepared/tabular/test.parquet")
        .drop(columns=json.loads((repo / layout.card("tabular")).read_text())["target"])
        .head(1)
        .to_json(orient="records")
    )[0]
    digit = sorted((repo / "data/demo/digits/7").iterdir())[0].read_bytes()
    scene = sorted((repo / "data/prepared/detect/images/test").iterdir())[0].read_bytes()
    return {
        "tabular": {"json": {"rows": [row]}},
        "image": {"files": {"file": ("digit.png", digit, "image/png")}},
        "detect": {"files": {"file": ("scene.png", scene, "image/png")}},
    }


async def rss_mb(client) -> float:
    text = (await client.get("/metrics")).text
    return float(re.search(r"^worker_resident_memory_bytes (\S+)$", text, re.M).group(1)) / 2**20


async def run(url: str, clients: int, total: int, repo: Path, samples: int = 5) -> dict:
    import httpx

    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"{url}: this load test only targets this machine (127.0.0.1)")
    bodies = payloads(repo)
    workers = httpx.get(f"{url}/ready", timeout=30).json().get("workers", 1)
    plan = [task for _ in range(total // 10 + 1) for task, n in MIX for _ in range(n)][:total]
    latencies: dict[str, list[float]] = {t: [] for t, _ in MIX}
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for task in plan:
        queue.put_nowait(task)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    from app.settings import parse_api_keys

    keys = parse_api_keys(os.environ.get("APP_API_KEYS", ""))
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=limits, headers=headers
    ) as client:
        # Warm-up at full concurrency (not counted): the server's thread pool and allocator
        # arenas reach their working size, so what memory does afterwards is the signal.
        warm = [t for t, n in MIX for _ in range(n)] * max(1, clients // 10)
        await asyncio.gather(*(client.post(f"/predict/{t}", **bodies[t]) for t in warm))
        memory = [await rss_mb(client)]
        checkpoints = {int(total * (i + 1) / samples) for i in range(samples)}
        done = 0

        async def worker():
            nonlocal done
            while not queue.empty():
                task = queue.get_nowait()
                start = time.perf_counter()
                try:
                    r = await client.post(f"/predict/{task}", **bodies[task])
                    if r.status_code != 200:
                        errors.append(f"{task}: {r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{task}: {type(e).__name__}: {e}")
                latencies[task].append(time.perf_counter() - start)
                done += 1
                if done in checkpoints:
                    memory.append(await rss_mb(client))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    stats = {
        t: {
            "n": len(v),
            "p50_ms": round(float(np.percentile(v, 50)) * 1000, 2),
            "p99_ms": round(float(np.percentile(v, 99)) * 1000, 2),
        }
        for t, v in latencies.items()
        if v
    }
    return {
        "workers": workers,
        "clients": clients,
        "requests": total,
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(seconds, 2),
        "requests_per_s": round(total / seconds, 1),
        "latency": stats,
        "rss_mb": [round(m, 1) for m in memory],
        "rss_growth_after_warmup_mb": round(memory[-1] - memory[0], 1),
    }


async def steady(url: str, clients: int, body: dict, stop: asyncio.Event) -> list[tuple]:
    """Tabular predictions from `clients` concurrent clients until `stop` is set: one
    (start, latency s, status, model_version or the error, client) per request, start on
    time.perf_counter()'s clock. For a rollout under load (tests/test_rollout.py): which
    version answered, and when."""
    import httpx

    seen: list[tuple] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    r = await client.post("/predict/tabular", json=body)
                    status = r.status_code
                    what = r.json().get("model_version") if status == 200 else r.text[:200]
                except httpx.HTTPError as e:
                    status, what = 0, f"{type(e).__name__}: {e}"
                seen.append((start, time.perf_counter() - start, status, what, i))

        await asyncio.gather(*(one(i) for i in range(clients)))
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tools.loadtest")
    ap.add_argument("url")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--out", default="metrics/load.json")
    args = ap.parse_args()
    result = asyncio.run(run(args.url, args.clients, args.requests, Path(args.repo)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.is_file() else {}
    runs = {
        k: v for k, v in runs.items() if k.startswith("workers_")
    }  # an older single-run file is replaced
    runs[f"workers_{result['workers']}"] = result
    out.write_text(json.dumps(dict(sorted(runs.items())), indent=2) + "\n")
    print(json.dumps(result, indent=2))
    raise SystemExit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
