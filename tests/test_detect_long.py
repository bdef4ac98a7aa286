"""Long detection runs: watched while they run, resumed after a kill, fine-tuned from local
weights, flagged when they learned nothing, exported as each ONNX graph kind.

Real `python -m stages ...` processes in repo copies, real signals, real Ultralytics.
Tiny (30 scenes of 64 × 64, 2 epochs): a model this small learns nothing (mAP 0), which
is what the "learned nothing" check must say; its outputs are the head's priors, far from
any threshold at conf 0.002 (see tests/detect_helpers.py), so export parity is exact.

Resume is not bit-exact in Ultralytics, and this does not pretend it is: its last.pt holds
the EMA weights and the optimizer state in fp16 and no RNG state, and a resumed run
continues training from the (fp16) EMA weights with freshly seeded augmentation and batch
order. So the resumed run matches the uninterrupted one exactly up to the checkpoint
(its DVCLive rows are rewritten from last.pt, bit for bit) and within RESUME_TOLERANCE after.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_repo, set_params, stage
from detect_helpers import CONF, TINY_DETECT, write_shapes

pytestmark = pytest.mark.slow

EPOCHS = 2
TINY = {**TINY_DETECT, "detect.train.epochs": EPOCHS}
LIVE = Path("metrics/detect/train")
RUN = Path(".cache/detect/runs/train")
# Measured on 2 cores (SIGTERM and SIGKILL, killed in epoch 2 of 2): the final validation
# losses of a resumed and an uninterrupted run differed by under 1% (box 0.01185 vs 0.01176);
# training losses by up to 50% (one epoch of 4 batches with other mosaics); mAP is 0 in both.
RESUME_TOLERANCE = {"val_box_loss": 0.05, "val_cls_loss": 0.05, "val_dfl_loss": 0.05}  # relative
METRICS_TOLERANCE = {"mAP50": 0.02, "mAP50-95": 0.02}  # absolute


@pytest.fixture(scope="module", autouse=True)
def fake_home(tmp_path_factory):
    """HOME for every subprocess: Ultralytics must write nothing outside the repo."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.delenv("XDG_CONFIG_HOME", raising=False)
        mp.delenv("YOLO_CONFIG_DIR", raising=False)
        yield home


@pytest.fixture(scope="module")
def validated(tmp_path_factory) -> Path:
    """30 scenes prepared and validated, TINY params."""
    repo = copy_repo(tmp_path_factory.mktemp("detect_long") / "repo")
    write_shapes(repo / "data/tiny", 30)
    set_params(repo, TINY)
    stage(repo, "prepare", "detect")
    stage(repo, "validate", "detect")
    shutil.rmtree(repo / LIVE)  # the committed log of the full demo run
    return repo


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def live_table(repo: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(repo / LIVE / "plots" / "metrics" / f"{name}.tsv", sep="\t")


def live_rows(repo: Path) -> dict[str, list[float]]:
    folder = repo / LIVE / "plots" / "metrics"
    return {p.stem: live_table(repo, p.stem)[p.stem].tolist() for p in sorted(folder.glob("*.tsv"))}


@pytest.fixture(scope="module")
def uninterrupted(validated, tmp_path_factory) -> Path:
    repo = clone(validated, tmp_path_factory.mktemp("uninterrupted") / "repo")
    out = stage(repo, "train", "detect")
    assert "resuming" not in out.stderr
    return repo


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return found


def first_row_logged(repo: Path) -> bool:
    tsv = repo / LIVE / "plots" / "metrics" / "mAP50.tsv"
    return tsv.is_file() and len(tsv.read_text().splitlines()) >= 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_detection_is_watched_while_it_runs_and_resumes_after_a_kill(
    sig, validated, uninterrupted, tmp_path
):
    repo = clone(validated, tmp_path / "repo")
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages", "train", "detect"],
            cwd=repo,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Watched: epoch 1's row is in metrics/detect/train while the run is still going.
        wait_for(lambda: first_row_logged(repo), proc, log)
        assert proc.poll() is None
        assert live_table(repo, "mAP50")["step"].tolist() == [0]
        assert set(live_rows(repo)) >= {
            "mAP50",
            "mAP50-95",
            "precision",
            "recall",
            "train_box_loss",
            "val_box_loss",
            "lr",
        }
        # Killed at once, in epoch 2: its last.pt is written only after its 4 batches and its
        # validation. (A fixed sleep here raced the end of the run on a quiet machine.)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = log.read_text(errors="replace")
    assert "trained yolo11n.yaml" not in killed, "the run ended before the kill"
    assert not (repo / "models/detect/model.pt").exists()
    fingerprint = (repo / RUN / "fingerprint.txt").read_text()
    saved = clone(repo / RUN, tmp_path / "run-copy")
    from stages.detect import yolo

    ckpt = yolo.resume_point(clone(saved, tmp_path / "probe"), fingerprint, EPOCHS)
    assert ckpt and ckpt["epoch"] == 0, (
        "the kill came after epoch 2's checkpoint: nothing to resume"
    )

    out = stage(repo, "train", "detect")
    assert re.search(r"resuming from \S+/weights/last\.pt after epoch 1", out.stderr), out.stderr[
        -3000:
    ]
    got, want = live_rows(repo), live_rows(uninterrupted)
    assert set(got) == set(want)
    for name in got:
        assert live_table(repo, name)["step"].tolist() == list(range(EPOCHS)), name
        assert got[name][0] == want[name][0], (
            name
        )  # the checkpointed epoch: rewritten from last.pt, exactly
    for name, rel in RESUME_TOLERANCE.items():
        assert got[name][-1] == pytest.approx(want[name][-1], rel=rel), name
    for name, tol in METRICS_TOLERANCE.items():
        assert got[name][-1] == pytest.approx(want[name][-1], abs=tol), name
    assert (repo / "models/detect/model.pt").exists()

    # The resume decision itself: another fingerprint, or a torn last.pt, starts afresh.
    other = clone(saved, tmp_path / "other")
    assert (
        yolo.resume_point(other, "another-run", EPOCHS) is None and not (other / "weights").exists()
    )
    assert (other / "fingerprint.txt").read_text() == "another-run"
    torn = clone(saved, tmp_path / "torn")
    last = torn / "weights/last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert yolo.resume_point(torn, fingerprint, EPOCHS) is None
    assert yolo.resume_point(clone(saved, tmp_path / "same"), fingerprint, EPOCHS)["epoch"] == 0
    assert (
        yolo.resume_point(clone(saved, tmp_path / "shorter"), fingerprint, 1) is None
    )  # nothing left to train


def test_fine_tune_from_local_weights(uninterrupted, tmp_path):
    """detect.train.model names a local .pt (here an earlier run's model.pt, copied aside:
    dvc repro deletes models/detect/model.pt before training). Ultralytics transfers what
    matches: class outputs are remapped by class name (another order, a subset), and with
    no name in common the class outputs start fresh while the rest is transferred."""
    repo = clone(uninterrupted, tmp_path / "repo")
    (repo / "weights").mkdir()
    shutil.copy(
        repo / "models/detect/model.pt", repo / "weights/demo.pt"
    )  # circle, square, triangle
    set_params(repo, {"detect.train.model": "models/detect/model.pt"})
    (repo / "models/detect/model.pt").unlink()
    res = stage(repo, "train", "detect", check=False)
    assert (
        res.returncode == 1
        and "dvc repro deletes models/detect/model.pt before training" in res.stderr
    )

    # Two classes, square and circle (the demo's 1 and 0; triangles dropped).
    for f in (repo / "data/tiny/labels").glob("*.txt"):
        rows = [line.split(" ", 1) for line in f.read_text().splitlines()]
        f.write_text("".join(f"{1 - int(c)} {rest}\n" for c, rest in rows if c in "01"))
    set_params(repo, {"detect.train.model": "weights/demo.pt", "detect.train.epochs": 1})

    def transferred(names: str) -> tuple[int, int]:
        (repo / "data/tiny/data.yaml").write_text(names)
        stage(repo, "prepare", "detect")
        res = stage(repo, "train", "detect")
        found = re.search(
            r"Transferred (\d+)/(\d+) items from pretrained weights", res.stdout + res.stderr
        )
        assert found, (res.stdout + res.stderr)[-3000:]
        return int(found.group(1)), int(found.group(2))

    got, total = transferred("names:\n  0: square\n  1: circle\n")
    assert got == total  # every tensor: the class rows remapped by name
    got, total = transferred("names:\n  0: ball\n  1: box\n")
    assert 0.9 * total < got < total  # no name in common: the class outputs start fresh


# The demo's recipe scaled to 64 px so that it fits the suite; measured on 2 cores: 400 scenes
# (280 to train on) for 30 epochs from scratch reach val mAP50 0.24 in 2 min; then 3 epochs
# on 50 new scenes give test mAP50 0.26 from those weights and 0.0 from scratch (docs/detect.md
# has the same comparison from the real demo weights at 128 px).
PRETRAIN = {
    **TINY_DETECT,
    "detect.train.epochs": 30,
    "detect.train.batch": 16,
    "detect.train.patience": 100,
    "detect.evaluate.coco_tolerance": 0.1,
}  # pycocotools vs Ultralytics on 8 test images: not this test's subject


def test_fine_tuning_from_demo_weights_beats_training_from_scratch(tmp_path):
    """Weights trained on 400 demo scenes, then the same 3 epochs on 50 other scenes (a new
    user's small set) from those weights and from scratch: the fine-tuned model finds the
    shapes, the one from scratch learns nothing and evaluate says so."""
    pre = copy_repo(tmp_path / "pre")
    write_shapes(pre / "data/tiny", 400, seed=1)
    set_params(pre, PRETRAIN)
    stage(pre, "prepare", "detect")
    stage(pre, "train", "detect")
    small = copy_repo(tmp_path / "small")
    write_shapes(small / "data/tiny", 50, seed=7)
    (small / "weights").mkdir()
    shutil.copy(pre / "models/detect/model.pt", small / "weights/demo.pt")
    set_params(small, {**PRETRAIN, "detect.train.epochs": 3})
    stage(small, "prepare", "detect")
    stage(small, "validate", "detect")

    def trained_from(model: str) -> dict:
        set_params(small, {"detect.train.model": model})
        stage(small, "train", "detect")
        stage(small, "evaluate", "detect")
        return json.loads((small / "metrics/detect/metrics.json").read_text())

    scratch, tuned = trained_from("yolo11n.yaml"), trained_from("weights/demo.pt")
    assert tuned["test"]["mAP50"] >= 0.15 and scratch["test"]["mAP50"] < 0.05, (
        tuned["test"],
        scratch["test"],
    )
    assert not tuned["warnings"] and "learned nothing" in scratch["warnings"][0]


def test_evaluate_says_when_the_model_learned_nothing(uninterrupted, tmp_path):
    """mAP50 0 < detect.evaluate.min_map50: a warning in the log, in metrics.json and (through
    export) in the model card; fail_if_untrained turns it into a failed stage."""
    repo = clone(uninterrupted, tmp_path / "repo")
    res = stage(repo, "evaluate", "detect")
    assert re.search(
        r"^warning: the detect model learned nothing: test mAP50 0 is not above", res.stderr, re.M
    )
    warnings = json.loads((repo / "metrics/detect/metrics.json").read_text())["warnings"]
    assert len(warnings) == 1 and "detect.train.model" in warnings[0] and "epochs" in warnings[0]
    set_params(repo, {"detect.export.conf": CONF})
    stage(repo, "export", "detect")
    card = json.loads((repo / "models/detect/model.json").read_text())
    assert card["metrics"]["warnings"] == warnings
    set_params(repo, {"detect.evaluate.fail_if_untrained": True})
    res = stage(repo, "evaluate", "detect", check=False)
    assert res.returncode == 1
    assert re.search(
        r"^error: the detect model learned nothing: .*fail_if_untrained is true\)$",
        res.stderr,
        re.M,
    )


@pytest.mark.parametrize(
    "graph,model", [("raw", "yolo11n.yaml"), ("nms", "yolo11n.yaml"), ("end2end", "yolo26n.yaml")]
)
def test_onnx_graph_types_match_ultralytics(graph, model, validated, uninterrupted, tmp_path):
    """Each graph kind Ultralytics exports here (the raw head, NMS inside, an NMS-free
    YOLO26 head end to end): export's parity check (our predict vs Ultralytics' predict on
    the val images, which fails the stage below min_matched) passes, predict recognises the
    kind from the graph, and a batch answers as images one by one."""
    from stages.core.inference import open_session
    from stages.detect.boxes import load_for_detection
    from stages.detect.infer import graph_type, predict

    if model == "yolo11n.yaml":
        repo = clone(uninterrupted, tmp_path / "repo")
    else:
        repo = clone(validated, tmp_path / "repo")
        set_params(repo, {"detect.train.model": model, "detect.train.epochs": 1})
        stage(repo, "train", "detect")
    stage(repo, "evaluate", "detect")
    # end2end, one epoch of YOLO26 at conf 0.002 (measured): every box of Ultralytics' torch
    # predict is in the ONNX output (1.0), but the graph's top-k over (anchor, class) pairs
    # also returns the same anchor's other classes above 0.002 (48 boxes against 16 on the 4
    # val images, matched_of_onnx 0.33); not yet explained, so only one way is checked there.
    floor = 0.3 if graph == "end2end" else 0.9
    set_params(
        repo,
        {
            "detect.export.graph": graph,
            "detect.export.conf": CONF,
            "detect.export.min_matched": floor,
        },
    )
    stage(repo, "export", "detect")
    card = json.loads((repo / "models/detect/model.json").read_text())
    assert card["postprocessing"]["graph"] == graph
    assert (
        card["parity"]["matched_of_ultralytics"] >= 0.9
        and card["parity"]["matched_of_onnx"] >= floor
    )
    assert card["parity"]["boxes_ultralytics"] > 0
    session = open_session(repo / "models/detect/model.onnx")
    assert graph_type(session) == graph
    files = sorted((repo / "data/prepared/detect/images/val").iterdir())[:3]
    images = [load_for_detection(f, 64) for f in files]
    together = predict(session, images, CONF, 0.7)
    alone = [predict(session, [im], CONF, 0.7)[0] for im in images]
    for a, b in zip(together, alone, strict=False):
        np.testing.assert_allclose(a, b, atol=1e-3)
