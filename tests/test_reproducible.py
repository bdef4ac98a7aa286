"""Outputs reproduce byte for byte: a forced rerun of the whole demo pipeline (tiny params,
all three tasks, detection included) writes an identical dvc.lock, so every DVC output,
model files and model cards among them, has the same hash. Timings live in .cache/timings
and Data Docs are no output, for that reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run

pytestmark = pytest.mark.slow


def test_forced_rerun_writes_an_identical_dvc_lock(served_repo: Path, tmp_path: Path):
    # A copy of the served repo (outputs, cache and all): the session's other tests keep theirs.
    repo = Path(shutil.copytree(served_repo, tmp_path / "repo", symlinks=True))
    before = (repo / "dvc.lock").read_text()
    run(repo, "dvc", "repro", "--force", timeout=900)
    after = (repo / "dvc.lock").read_text()
    if after != before:
        old, new = (yaml.safe_load(t)["stages"] for t in (before, after))
        changed = {
            name: [
                o["path"]
                for o, p in zip(new[name].get("outs", []), old[name].get("outs", []), strict=False)
                if o != p
            ]
            for name in new
            if new[name] != old.get(name)
        }
        pytest.fail(f"a forced rerun changed these stages' outputs: {changed}")
    card = yaml.safe_load((repo / "models/detect/model.json").read_text())
    assert card["provenance"]["deps"], "the card names what trained the model (from dvc.lock)"
