"""Side-by-side timing on a noisy machine: contenders alternate (the order rotates every
round), each is repeated, and what is compared is the median. Plus the rows every section
prints and the description of the machine that bench.json records."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def alternate(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    number: int | None = 1,
    warmup: int = 1,
    sample_s: float = 0.05,
    max_s: float | None = None,
    min_rounds: int = 3,
    before: Callable[[str], Any] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender: `rounds` samples of `number` calls each, the
    contenders interleaved within a round and their order rotated from round to round.
    number=None: as many calls per sample as fill about `sample_s` (fast calls).
    max_s: no new round after that many seconds, once `min_rounds` are done (slow calls).
    before(name), if given, runs untimed before each sample of that contender."""
    names = list(contenders)
    before = before or (lambda name: None)
    for _ in range(warmup):
        for name in names:
            before(name)
            contenders[name]()
    counts = dict.fromkeys(names, number or 1)
    if number is None:
        for name in names:
            before(name)
            start = time.perf_counter()
            contenders[name]()
            counts[name] = max(1, int(sample_s / max(time.perf_counter() - start, 1e-7)))
    times: dict[str, list[float]] = {name: [] for name in names}
    began = time.perf_counter()
    for r in range(rounds):
        if max_s is not None and r >= min_rounds and time.perf_counter() - began > max_s:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, count = contenders[name], counts[name]
            before(name)
            start = time.perf_counter()
            for _ in range(count):
                fn()
            times[name].append((time.perf_counter() - start) / count)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Row:
    """One printed line: what, contender A, contender B, A/B, the target and whether it holds."""

    what: str
    a: tuple[str, float, str]  # (name, value, unit)
    b: tuple[str, float, str] | None = None
    ratio: float | None = None
    target: str = ""
    holds: bool | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["a"] = dict(zip(("name", "value", "unit"), self.a, strict=False))
        d["b"] = dict(zip(("name", "value", "unit"), self.b, strict=False)) if self.b else None
        return d


def ratio_row(
    what: str,
    a: tuple[str, float, str],
    b: tuple[str, float, str],
    at_least: float | None = None,
    **extra,
) -> Row:
    """A/B (both rates: higher is better) against an optional minimum ratio."""
    ratio = a[1] / b[1] if b[1] else float("inf")
    return Row(
        what,
        a,
        b,
        ratio,
        f">= {at_least:g}x" if at_least is not None else "",
        None if at_least is None else ratio >= at_least,
        extra,
    )


def fmt(value: float, unit: str) -> str:
    if unit in ("s", "ms", "us", "x", "GiB", "MiB"):
        text = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}"


def print_table(title: str, rows: list[Row], notes: list[str]) -> None:
    cells = [
        (
            r.what,
            f"{r.a[0]} {fmt(r.a[1], r.a[2])}",
            f"{r.b[0]} {fmt(r.b[1], r.b[2])}" if r.b else "",
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            r.target,
            "" if r.holds is None else ("yes" if r.holds else "NO"),
        )
        for r in rows
    ]
    head = ("what", "A", "B", "A/B", "target", "holds")
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    line = lambda c: "  ".join(x.ljust(w) for x, w in zip(c, widths, strict=False)).rstrip()  # noqa: E731
    print(f"\n== {title}")
    print(line(head))
    print(line(["-" * w for w in widths]))
    for c in cells:
        print(line(c))
    for n in notes:
        print(f"  note: {n}")


def machine() -> dict:
    """CPU model, cores, library versions: what the numbers were measured on."""
    import onnxruntime
    import torch

    from stages.core.distributed import cpu_supports_bf16
    from stages.core.inference import physical_cores

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "native_bf16": cpu_supports_bf16(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
    }
