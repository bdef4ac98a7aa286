"""Every place this project changes Great Expectations' internals (GX Core 1.x), in one small
adapter. Each change is for speed, measured in `make bench`, and leaves GX's results as they
were (tests/test_gx_patches.py checks both: that each change still applies to the GX installed,
and that the results and metric ids stay GX's own).

    apply()             once per process, before GX validates anything
    one_validation()    the scope of one validation call, for the memo below

Each change first looks for what it replaces (a module constant GX still reads, a property, a
method of the expected signature). On a GX release where one is gone, that change is left out
(GX runs its own, slower code) and named in SKIPPED, which the test asserts is empty: the
pipeline keeps working and the test fails loudly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import threading
from collections import Counter

SKIPPED: list[str] = []  # changes that found nothing to change in the GX installed
MEMO = Counter()  # "built" and "reused" objects of the memo, for the test
_validating = threading.local()  # .memo: {(method, id): (object, result)} while a thread validates


@functools.cache
def apply() -> None:
    _no_batch_hash()
    _memoise_configurations()
    _plain_ids()


@contextlib.contextmanager
def one_validation():
    """Within one validation call nothing GX memoises here changes; the memo is dropped after."""
    _validating.memo = {}
    try:
        yield
    finally:
        _validating.memo = None


def _no_batch_hash() -> None:
    """GX fingerprints every pandas batch under HASH_THRESHOLD bytes (1 GB) with an md5 of
    hash_pandas_object over all its cells and its index, a batch marker nothing here reads: a
    third of the suite's time on a million rows. Above the threshold GX skips it: make that
    always."""
    import great_expectations.execution_engine.pandas_execution_engine as engine

    if "HASH_THRESHOLD" not in inspect.getsource(engine.PandasExecutionEngine):
        SKIPPED.append("pandas_execution_engine.HASH_THRESHOLD (no longer read)")
        return
    engine.HASH_THRESHOLD = 0


def _memoise_configurations() -> None:
    """While GX plans a validation it turns each expectation's configuration back into an
    expectation (to_domain_obj, a pydantic model) for every metric it needs, about ten per
    expectation, and rebuilds a configuration from that model for every keyword it looks up:
    about 2,600 models built for the demo's 22 expectations, half of GX's fixed cost per run
    (the floor of `infer` on 100,000 rows). Within one validation call nothing changes
    either, so each is built once per call; outside one (and in other threads) GX's own
    methods run. A memo holds the object it was built from, so an id is never reused while
    it lives, and is dropped after the call."""
    from great_expectations.expectations.expectation import Expectation
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    config = inspect.getattr_static(Expectation, "configuration", None)
    to_domain = getattr(ExpectationConfiguration, "to_domain_obj", None)
    if not isinstance(config, property) or not _takes_only_self(to_domain):
        SKIPPED.append("Expectation.configuration / ExpectationConfiguration.to_domain_obj")
        return
    Expectation.configuration = property(_once(config.fget), doc=config.__doc__)
    ExpectationConfiguration.to_domain_obj = _once(to_domain)


def _once(build):
    def memoised(self):
        memo = getattr(_validating, "memo", None)
        if memo is None:
            return build(self)
        hit = memo.get((build, id(self)))
        MEMO["reused" if hit else "built"] += 1
        if hit is None:
            hit = memo[build, id(self)] = (self, build(self))
        return hit[1]

    return memoised


def _takes_only_self(method) -> bool:
    return callable(method) and list(inspect.signature(method).parameters) == ["self"]


def _plain_ids() -> None:
    """GX keys each metric it plans by an md5 of its keyword dicts (IDDict.to_id), made
    JSON-safe first by a walk that tries a dozen numpy checks on every value, None included:
    a fifth of GX's fixed cost per run. A dict of plain JSON values (str keys; str, int, bool,
    None, finite floats, lists and dicts of them) is dumped as it is, which is the same
    string, so the same id; the rest goes GX's way."""
    from great_expectations.core.id_dict import IDDict

    own = getattr(IDDict, "to_id", None)
    if (
        not callable(own)
        or list(inspect.signature(own).parameters) != ["self", "id_keys", "id_ignore_keys"]
        or not isinstance(getattr(IDDict, "_id_ignore_keys", None), set)
    ):
        SKIPPED.append("IDDict.to_id")
        return

    def to_id(self, id_keys=None, id_ignore_keys=None):
        if id_keys is None and id_ignore_keys is None:
            keys = self.keys() - self._id_ignore_keys
            if len(keys) > 1:
                d = {k: self[k] for k in keys}
                if _json_plain(d):
                    return hashlib.md5(
                        json.dumps(d, sort_keys=True).encode(), usedforsecurity=False
                    ).hexdigest()
        return own(self, id_keys, id_ignore_keys)

    to_id.gx = own  # GX's own, for the test
    IDDict.to_id = to_id


def _json_plain(v) -> bool:
    t = type(v)
    if t is str or t is int or t is bool or v is None:
        return True
    if t is float:
        return v == v  # GX writes NaN as null
    if t is list or t is tuple:
        return all(_json_plain(x) for x in v)
    if t is dict:
        return all(type(k) is str and _json_plain(x) for k, x in v.items())
    return False
