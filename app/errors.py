"""The one error type for a client's bad input, wherever it is found (edge, routes, tensors,
models): `BadInput(message, status)`, answered as JSON with that status and the message, by
the app's HTTPException handler (app/routes.py) or, outside the routes, by the edge.

An HTTPException, so that FastAPI's body reading passes it on as it is (any other exception
raised while it reads becomes a 400) and one handler answers them all; str() is the message,
so the UI shows it as it is."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BadInput(HTTPException):
    def __init__(self, message: str, status: int = 422, headers: dict | None = None):
        super().__init__(status, message, headers=headers)

    @property
    def status(self) -> int:
        return self.status_code

    def __str__(self) -> str:
        return str(self.detail)


def error_body(path: str, message: str) -> bytes:
    """REST errors say {"detail"}, the Open Inference Protocol's {"error"}."""
    key = "error" if path.startswith("/v2") else "detail"
    return json.dumps({key: message}).encode()
