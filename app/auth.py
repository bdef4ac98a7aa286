"""API keys (APP_API_KEYS): the predict and v2 infer routes require `Authorization: Bearer
<key>` when keys are set. Every key is compared in constant time (hmac.compare_digest), and
all of them each time, so the time taken says nothing about which key came close."""

from __future__ import annotations

import hmac

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import BadInput

bearer = HTTPBearer(auto_error=False, description="one of the keys in APP_API_KEYS")


def encoded(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """The keys as app.state.api_keys holds them."""
    return tuple(k.encode() for k in keys)


def key_matches(given: str, keys: tuple[bytes, ...]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key)
    return ok


def api_key(
    request: Request,
    creds: HTTPAuthorizationCredentials | None = Security(bearer),  # noqa: B008
) -> None:
    """A FastAPI dependency: nothing when no keys are set (the app's settings), else 401
    without a matching key."""
    keys = request.app.state.api_keys
    if keys and (creds is None or not key_matches(creds.credentials, keys)):
        raise BadInput(
            "this route needs an API key: send `Authorization: Bearer <key>`"
            if creds is None
            else "the API key is not valid",
            401,
            {"WWW-Authenticate": "Bearer"},
        )


def caller(request: Request) -> str | None:
    """The API key a request carries (whether or not keys are on), for sticky routing."""
    given = request.headers.get("authorization", "")
    return given[7:] if given.lower().startswith("bearer ") else None
