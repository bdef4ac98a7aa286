"""API keys (APP_API_KEYS): the predict and v2 infer routes require `Authorization: Bearer
<key>` when keys are set. Every key is compared in constant time (hmac.compare_digest), and
all of them each time, so the time taken says nothing about which key came close."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer = HTTPBearer(auto_error=False, description="one of the keys in APP_API_KEYS")


def key_matches(given: str, keys: tuple[bytes, ...]) -> bool:
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key)
    return ok


def key_check(keys: tuple[str, ...]):
    """A FastAPI dependency: nothing when no keys are set, else 401 without a matching key."""
    encoded = tuple(k.encode() for k in keys)

    def check(creds: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:  # noqa: B008
        if encoded and (creds is None or not key_matches(creds.credentials, encoded)):
            raise HTTPException(
                401,
                "this route needs an API key: send `Authorization: Bearer <key>`"
                if creds is None
                else "the API key is not valid",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
