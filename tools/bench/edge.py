"""Bench section `edge`: what the HTTP edge (app/edge.py: request ID, body limit, HEAD/405
check, access log line, metrics) and the API key check (app/auth.py) add to a request.

The same POST /predict/tabular goes straight into three builds of the app (ASGI calls in
this process, no sockets, so the difference is the code and nothing else): without the
edge, with it, and with it and two API keys (the request carries the second). No model is
loaded, so each request ends in the route's 503 after the body is parsed and checked: the
model's own time, the same in all three, is left out.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tools.bench.timing import Row, alternate, median

BODY = json.dumps({"rows": [{"bill_length_mm": 40.1, "island": "Biscoe"}]}).encode()


def build(scratch: Path, edge: bool, keys: tuple[str, ...]):
    from app import edge as middlewares
    from app.server import api
    from app.settings import load_settings

    cfg = load_settings().replace(api_keys=keys)
    app = api(cfg, scratch / "no-models")
    if not edge:
        ours = {getattr(middlewares, n) for n in middlewares.__all__}
        app.user_middleware = [m for m in app.user_middleware if m.cls not in ours]
    return app


def caller(app, headers: list[tuple[bytes, bytes]]):
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict/tabular",
        "raw_path": b"/predict/tabular",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    status = []

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    loop = asyncio.new_event_loop()

    def call() -> int:
        loop.run_until_complete(app(dict(scope), receive, send))
        return status[-1]

    return call


def edge(quick: bool, scratch: Path) -> dict:
    keys = ("first-key-0123456789", "second-key-0123456789")
    calls = {
        "bare": caller(build(scratch, False, ()), []),
        "edge": caller(build(scratch, True, ()), [(b"x-request-id", b"bench-1")]),
        "edge+keys": caller(
            build(scratch, True, keys),
            [(b"x-request-id", b"bench-1"), (b"authorization", f"Bearer {keys[1]}".encode())],
        ),
    }
    statuses = {name: call() for name, call in calls.items()}
    assert set(statuses.values()) == {503}, statuses  # the same path through each build
    times = alternate(
        calls, rounds=5 if quick else 40, number=None, sample_s=0.01 if quick else 0.05
    )
    ms = {name: median(t) * 1000 for name, t in times.items()}
    added = ms["edge+keys"] - ms["bare"]
    rows = [
        Row(
            "p50 per request, edge + key check",
            ("edge+keys", ms["edge+keys"], "ms"),
            ("bare", ms["bare"], "ms"),
            ms["edge+keys"] / ms["bare"],
            "adds <= 0.2 ms",
            added <= 0.2,
            {"added_ms": added},
        ),
        Row(
            "p50 per request, key check alone",
            ("edge+keys", ms["edge+keys"], "ms"),
            ("edge", ms["edge"], "ms"),
            ms["edge+keys"] / ms["edge"],
            f"adds {ms['edge+keys'] - ms['edge']:.3f} ms",
        ),
    ]
    notes = [
        "ASGI calls in-process, interleaved; each ends in the route's 503 (no model) after the "
        "body is parsed and validated, so the model's time is left out",
        "the access log line is formatted in each; where it is written (stderr) is not timed",
    ]
    return {"rows": rows, "notes": notes, "details": {"ms": ms}}
