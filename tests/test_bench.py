"""The benchmark suite (`make bench`, tools/bench/) in its quick mode: every section runs and
bench.json has the structure the full run writes. The numbers themselves are not checked
here (they are machine- and load-dependent): this keeps the bench code from rotting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SECTIONS = {
    "inference",
    "serving",
    "batch",
    "training",
    "validation",
    "pipeline",
    "edge",
    "trust",
    "labels",
    "numerics",
    "tabular_cost",
    "explain",
    "ensemble",
}


def test_quick_bench_writes_every_section(tmp_path, served_repo):
    # In the served repo (tiny models of all three tasks, up to date), so that a fresh clone
    # without `make run` runs it too.
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)],
        cwd=served_repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["date"]
    assert {"cpu", "physical_cores", "logical_cpus", "torch", "onnxruntime"} <= set(
        result["machine"]
    )
    assert set(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        # (the pipeline is not measured while someone else's dvc command holds the repository's lock)
        assert (section["rows"] or section["details"].get("busy")) and section["seconds"] >= 0, name
        for row in section["rows"]:
            assert {"what", "a", "b", "ratio", "target", "holds"} <= set(row), row
            assert row["a"]["value"] > 0 and row["a"]["unit"], row
            assert row["holds"] in (True, False, None)
            if row["b"] is not None and row["ratio"] is not None:
                assert row["ratio"] == pytest.approx(
                    row["a"]["value"] / row["b"]["value"], rel=1e-6
                ), row
    # Every target of the brief has its row (the pipeline's only when it is up to date).
    targets = {
        (name, r["what"].strip())
        for name, s in result["sections"].items()
        for r in s["rows"]
        if r["target"] and r["holds"] is not None
    }
    assert {
        ("inference", "image batch 1"),
        ("inference", "detect batch 1"),
        ("serving", "tabular p50 latency"),
        ("edge", "p50 per request, edge + key check"),
    } <= targets
    assert sum(name == "batch" for name, _ in targets) == 2
    assert sum(name == "training" and "amp" in what for name, what in targets) >= 2
    assert ("validation", "GX suite vs the 1M rows/s target") in targets
    assert {w for n, w in targets if n == "explain"} == {
        "20 columns (sampled): added p50",
        "60 columns (sampled): added p50",
    }
    assert result["targets"]["total"] == len(
        [r for s in result["sections"].values() for r in s["rows"] if r["holds"] is not None]
    )
    # The table is printed, section by section, with the targets at the end.
    for name in SECTIONS:
        assert f"== {name}" in res.stdout
    assert "== targets:" in res.stdout
