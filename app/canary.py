"""Canary and shadow (serve.canary, serve.shadow): a candidate model beside one task's served
model. A canary answers serve.canary.share of the callers, sticky per caller: the API key
when the request carries one, else its X-Request-ID (so a client that keeps its request id,
or its key, keeps its model). In shadow mode the candidate also scores a copy of every
request of its task, off the request path, and the answers that differ from the served
model's are counted (shadow_disagreements_total over shadow_rows_total).

Built through app/loading.py like any load, so a candidate whose features differ from the
served model's is refused at start-up (printed; the server serves without it)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app.predict import Loaded


def bucket(key: str) -> float:
    """A caller's fixed place in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


@dataclass
class Candidate:
    task: str
    model: Loaded
    share: float
    shadow: bool
    on_shadow: list = field(default_factory=list)  # callbacks (task, rows, disagreements)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="shadow")
    )

    def answers(self, task: str, caller: str) -> bool:
        """Whether the candidate answers this caller's request."""
        return task == self.task and self.share > 0 and bucket(caller) < self.share

    def mirror(self, task: str, used: Loaded, run, labels, answer) -> None:
        """In shadow mode, score a copy of a request the served model answered (`answer`):
        run(model) → an answer, labels(answer) → one comparable label per row."""
        if not self.shadow or task != self.task or used is self.model:
            return
        self.pool.submit(self._compare, task, run, labels, labels(answer))

    def _compare(self, task: str, run, labels, served: list) -> None:
        try:
            mine = labels(run(self.model))
        except Exception:  # noqa: BLE001 - a failed copy counts as disagreeing on every row
            mine = [None] * len(served)
        differ = sum(a != b for a, b in zip(served, mine, strict=False))
        for hook in self.on_shadow:
            hook(task, len(served), differ)
