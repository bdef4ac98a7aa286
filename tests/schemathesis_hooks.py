"""schemathesis hooks for tests/test_app.py (SCHEMATHESIS_HOOKS=schemathesis_hooks): half of
the JSON bodies go out with NaN, Infinity or -Infinity in place of some of their numbers.
schemathesis never generates them (they are not JSON), but Python's json, JavaScript's
JSON.stringify of a NaN-filled object by mistake and tritonclient write them, so the server
must answer them with a 4xx. Each such request adds a line to $NAN_LOG."""

from __future__ import annotations

import json
import os
import random

import schemathesis

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def poison(value, rng: random.Random):
    if isinstance(value, dict):
        return {k: poison(v, rng) for k, v in value.items()}
    if isinstance(value, list):
        return [poison(v, rng) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice(NON_FINITE)
    return value


@schemathesis.hook
def before_call(context, case, kwargs):
    rng = random.Random(repr(case.body))
    if isinstance(case.body, dict | list) and rng.random() < 0.5:
        body = json.dumps(poison(case.body, rng)).encode()  # allow_nan: the literals go out
        if b"NaN" not in body and b"Infinity" not in body:
            return  # no number in this body
        kwargs["data"], kwargs["json"] = body, None
        if os.environ.get("NAN_LOG"):
            with open(os.environ["NAN_LOG"], "a") as f:
                f.write(f"{case.method} {case.path}\n")
