"""The HTTP edge, as one pure ASGI middleware in front of every route (REST, v2, Gradio):

- a request ID: X-Request-ID echoed when the client sent a sane one, else generated; in the
  response and in the one structured (JSON) log line per request;
- the body size limit, for a Content-Length and for chunked bodies alike: the body is counted
  as the app reads it, and the request is answered 413 as soon as it passes the limit, without
  reading further;
- HEAD wherever GET works (answered as GET, without the body), and 405 with an Allow header
  for a wrong method on an API path (without this, the Gradio app mounted at / would answer
  every unknown method with its 404);
- per-task request metrics, and a JSON 500 for an unexpected exception.

Pure ASGI rather than @app.middleware("http"): BaseHTTPMiddleware reads nothing of the body
itself, but it cannot stop a handler in the middle of reading it, which the limit needs.
Headers are never logged, so neither are API keys.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount, Route

log = logging.getLogger("app.access")
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body reading passes it on as it is (any other
    exception there becomes a 400) and the app's handlers answer it."""

    def __init__(self, message: str):
        super().__init__(413, message, headers={"connection": "close"})


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k == b"x-request-id":
            given = v.decode("latin-1")
            if SANE_ID.fullmatch(given):
                return given
    return uuid.uuid4().hex


def task_of(path: str) -> str:
    """The task a request runs ("-" for none): /predict/<task>, /v2/models/<task>/.../infer."""
    parts = path.strip("/").split("/")
    if parts[0] == "predict" and len(parts) > 1:
        return parts[1]
    if parts[0] == "v2" and len(parts) > 3 and parts[1] == "models" and parts[-1] == "infer":
        return parts[2]
    return "-"


def error_body(path: str, message: str) -> bytes:
    """REST errors say {"detail"}, the Open Inference Protocol's {"error"}."""
    key = "error" if path.startswith("/v2") else "detail"
    return json.dumps({key: message}).encode()


class Edge:
    def __init__(self, app, max_bytes: int, max_upload_mb: float, metrics, routes_of):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics
        self.too_large = f"request body over the {max_upload_mb:g} MB limit"
        self.routes_of = routes_of  # () -> the app's routes (read once the app is complete)
        self._routes = None

    def allowed(self, scope) -> set[str] | None:
        """None when a route takes this method and path (or no API route has the path), else
        the methods the path takes."""
        if self._routes is None:
            self._routes = [
                r for r in self.routes_of() if isinstance(r, Route) and not isinstance(r, Mount)
            ]
        methods = set()
        for r in self._routes:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return None
            if match == Match.PARTIAL and r.methods:
                methods |= r.methods
        return methods or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        rid = request_id(scope["headers"])
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        state = {"status": 500, "started": False, "read": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        async def receiving():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.max_bytes:
                    raise BodyTooLarge(self.too_large)
            return message

        async def answer(status: int, message: str, headers=()):
            await sending(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers],
                }
            )
            await sending({"type": "http.response.body", "body": error_body(path, message)})

        size = dict(scope["headers"]).get(b"content-length", b"")
        # OPTIONS goes on: a CORS preflight is answered by the CORS middleware inside.
        allow = None if scope["method"] == "OPTIONS" else self.allowed(scope)
        if size.isdigit() and int(size) > self.max_bytes:
            await answer(413, self.too_large, [(b"connection", b"close")])
        elif allow is not None:
            if "GET" in allow:
                allow.add("HEAD")
            await answer(
                405,
                f"{scope['method']} is not allowed here; use {', '.join(sorted(allow))}",
                [(b"allow", ", ".join(sorted(allow)).encode())],
            )
        else:
            try:
                await self.app(scope, receiving, sending)
            except BodyTooLarge:
                if not state["started"]:
                    await answer(413, self.too_large, [(b"connection", b"close")])
            except Exception as e:  # noqa: BLE001 - logged with the request, answered as JSON
                log.error(
                    json.dumps(
                        {"event": "error", "request_id": rid, "path": path, "error": repr(e)}
                    )
                )
                if not state["started"]:
                    await answer(500, f"internal error: {type(e).__name__}")
        method = "HEAD" if head else scope["method"]
        self.finish(method, path, rid, state["status"], time.perf_counter() - start, size)

    def finish(self, method, path, rid: str, status: int, elapsed: float, size: bytes) -> None:
        task = task_of(path)
        if task != "-":
            self.metrics.observe(task, status, elapsed)
        log.info(
            json.dumps(
                {
                    "request_id": rid,
                    "method": method,
                    "path": path,
                    "status": status,
                    "ms": round(elapsed * 1000, 2),
                    "task": task,
                    "bytes": size.decode() or None,
                }
            )
        )
