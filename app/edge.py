"""The HTTP edge: small pure-ASGI middlewares in front of every route (REST, v2, Gradio),
each with one job. server.py stacks them, outermost first:

    RequestId      X-Request-ID echoed when the client sent a sane one, else generated
    AccessLog      one JSON log line and the request metrics per request
    ServerErrors   an unexpected exception: logged with the request id, answered as a JSON 500
    HeadAsGet      HEAD wherever GET works: answered as GET, without the body
    WrongMethod    405 with an Allow header for a wrong method on an API path (the Gradio app
                   mounted at / would otherwise answer every unknown method with its 404)
    BodyLimit      413 for a body over the limit, Content-Length or chunked alike: the body is
                   counted as the app reads it and reading stops at the limit

Pure ASGI rather than @app.middleware("http"): BaseHTTPMiddleware cannot stop a handler in
the middle of reading the body, which the limit needs. Headers are never logged, so neither
are API keys. The request id and the answering model's version travel in scope["state"]
(request.state in a route).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from starlette.routing import Match, Mount, Route

from app.errors import BadInput, error_body

__all__ = ["AccessLog", "BodyLimit", "HeadAsGet", "RequestId", "ServerErrors", "WrongMethod"]
log = logging.getLogger("app.access")
SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def state(scope) -> dict:
    """The per-request state Starlette exposes as request.state."""
    return scope.setdefault("state", {})


def header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


async def answer(send, path: str, status: int, message: str, headers=()) -> None:
    """A JSON error answer sent from the edge."""
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), *headers],
    }
    await send(start)
    await send({"type": "http.response.body", "body": error_body(path, message)})


def task_of(path: str) -> str:
    """The task a request runs ("-" for none): /predict/<task>, /v2/models/<task>/.../infer."""
    parts = path.strip("/").split("/")
    if parts[0] == "predict" and len(parts) > 1:
        return parts[1]
    if parts[0] == "v2" and len(parts) > 3 and parts[1] == "models" and parts[-1] == "infer":
        return parts[2]
    return "-"


class Tracked:
    """`send`, noting whether the response has started (after that, no error answer)."""

    def __init__(self, send):
        self.send, self.started = send, False

    async def __call__(self, message):
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class Http:
    """Base: passes lifespan and websocket scopes through; subclasses handle http."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        return await self.http(scope, receive, send)


class RequestId(Http):
    async def http(self, scope, receive, send):
        given = header(scope, b"x-request-id")
        rid = given if given and SANE_ID.fullmatch(given) else uuid.uuid4().hex
        state(scope)["request_id"] = rid

        async def sending(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


class AccessLog(Http):
    def __init__(self, app, metrics):
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope, receive, send):
        start, seen = time.perf_counter(), {"status": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.finish(scope, seen["status"], time.perf_counter() - start)

    def finish(self, scope, status: int, elapsed: float) -> None:
        task, s = task_of(scope["path"]), state(scope)
        version = s.get("model_version", "-")
        if task != "-":
            self.metrics.observe(task, version, status, elapsed)
        size = header(scope, b"content-length")
        entry = {
            "request_id": s.get("request_id"),
            "method": s.get("method", scope["method"]),
            "path": scope["path"],
            "status": status,
            "ms": round(elapsed * 1000, 2),
            "task": task,
            "version": version,
            "bytes": size or None,
        }
        log.info(json.dumps(entry))


class ServerErrors(Http):
    async def http(self, scope, receive, send):
        sending = Tracked(send)
        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - logged with the request, answered as JSON
            rid = state(scope).get("request_id")
            event = {"event": "error", "request_id": rid, "path": scope["path"], "error": repr(e)}
            log.error(json.dumps(event))
            if not sending.started:
                await answer(send, scope["path"], 500, f"internal error: {type(e).__name__}")


class HeadAsGet(Http):
    async def http(self, scope, receive, send):
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        state(scope)["method"] = "HEAD"  # what the access log says

        async def sending(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, sending)


class WrongMethod(Http):
    def __init__(self, app, routes_of):
        super().__init__(app)
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

    async def http(self, scope, receive, send):
        # OPTIONS goes on: a CORS preflight is answered by the CORS middleware inside.
        allow = None if scope["method"] == "OPTIONS" else self.allowed(scope)
        if allow is None:
            return await self.app(scope, receive, send)
        if "GET" in allow:
            allow.add("HEAD")
        listed = ", ".join(sorted(allow))
        message = f"{scope['method']} is not allowed here; use {listed}"
        await answer(send, scope["path"], 405, message, [(b"allow", listed.encode())])


class BodyLimit(Http):
    def __init__(self, app, max_bytes: int, max_upload_mb: float):
        super().__init__(app)
        self.max_bytes = max_bytes
        self.too_large = f"request body over the {max_upload_mb:g} MB limit"

    def error(self) -> BadInput:
        return BadInput(self.too_large, 413, {"connection": "close"})

    async def http(self, scope, receive, send):
        size = header(scope, b"content-length") or ""
        if size.isdigit() and int(size) > self.max_bytes:
            return await answer(
                send, scope["path"], 413, self.too_large, [(b"connection", b"close")]
            )
        read = 0

        async def receiving():
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise self.error()
            return message

        sending = Tracked(send)
        try:
            await self.app(scope, receiving, sending)
        except BadInput as e:  # the limit, raised where no route's handler answered it
            if e.status_code != 413 or sending.started:
                raise
            await answer(send, scope["path"], 413, self.too_large, [(b"connection", b"close")])
