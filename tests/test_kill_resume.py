"""Kill a running stage, resume it, and find nothing half-written.

Real `dvc repro` processes in temporary repo copies, real signals to their process group
(DVC runs the stage command as a child), no mocks.

Training (train@tabular, train@image × SIGTERM, SIGKILL): killed mid-epoch after at least
KILL_AFTER epochs are checkpointed, then `dvc repro evaluate@<task>` resumes from
models/<task>/checkpoints/last.pt. The resumed run must end with exactly what an
uninterrupted run with the same params ends with, to the bit: on the CPU with fixed
seeds there is no reason for any tolerance, so there is none (model.pt's state dict and
meta, metrics/<task>/train/metrics.json, every DVCLive .tsv, metrics/<task>/metrics.json).
The params cover AMP both ways: tabular keeps `amp: auto` (bf16 autocast on a CPU with
native bf16, as on the machine these tests were written on; elsewhere auto means off) and
image runs `amp: off` with DataLoader workers, BatchNorm, dropout and random augmentation.

Preparation (atomic_dir/atomic_path): a SIGKILL while prepare writes its output leaves
either the previous output or the complete new one, and the temporary siblings such a kill
leaves behind are removed by the next successful run instead of piling up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_repo, run, set_params

from stages.core.files import atomic_dir, atomic_path

pytestmark = pytest.mark.slow

# Long enough to be killed mid-epoch (tabular ~0.2 s an epoch, image ~1 s on two cores),
# short enough for the whole file to take a few minutes. patience 0: every run has all epochs.
# image: one DataLoader worker, whose augmentation RNG must resume too.
PARAMS = {
    "tabular": {
        "tabular.train.hidden": [64],
        "tabular.train.epochs": 30,
        "tabular.train.batch_size": 8,
        "tabular.train.patience": 0,
        "tabular.evaluate.baseline": False,
    },  # amp stays 'auto'
    "image": {
        "image.demo.size": 16,
        "image.data.image_size": 16,
        "image.data.split.val": 0.1,
        "image.data.split.test": 0.7,  # 360 training images
        "image.train.epochs": 4,
        "image.train.batch_size": 16,
        "image.train.patience": 0,
        "image.train.amp": "off",
        "image.train.num_workers": 1,
    },
}
KILL_AFTER = 2  # epochs checkpointed before the kill
TEMP = re.compile(r"^\..+\.(tmp|old)$")  # atomic_path / atomic_dir scratch names


# ---------------------------------------------------------------- processes


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group pgid."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in "ZX" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture
def spawn():
    """Start a command in its own session (so a signal reaches DVC and the stage it runs);
    whatever is still alive at the end of the test is SIGKILLed, pass or fail."""
    procs: list[subprocess.Popen] = []

    def start(repo: Path, log: Path, *cmd: str) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, cwd=repo, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def kill_group(proc: subprocess.Popen, sig: int, timeout: float = 60) -> None:
    """Send sig to the whole process group and wait until every member is gone."""
    os.killpg(proc.pid, sig)
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while group_members(proc.pid):
        assert time.monotonic() < deadline, (
            f"{signal.Signals(sig).name} left {group_members(proc.pid)} running"
        )
        time.sleep(0.05)


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if m := re.search(pattern, text, re.M):
            return m
        assert proc.poll() is None, f"exited {proc.returncode} before /{pattern}/:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no /{pattern}/ within {timeout} s:\n{text[-3000:]}"
        time.sleep(0.02)


# ---------------------------------------------------------------- files


def clone(src: Path, dst: Path) -> Path:
    """A copy of a prepared repo copy: git, DVC cache, dvc.lock and outputs included."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def assert_nothing_half_written(repo: Path) -> None:
    """No scratch files under models/, metrics/, data/; every file we can parse parses."""
    leftovers, broken = [], []
    for top in ("models", "metrics", "data"):
        for p in sorted((repo / top).rglob("*")):
            rel = p.relative_to(repo)
            if TEMP.match(p.name):
                leftovers.append(str(rel))
            if not p.is_file():
                continue
            try:
                if p.suffix == ".pt":
                    torch.load(p, map_location="cpu", weights_only=True)
                elif p.suffix == ".json":
                    json.loads(p.read_text())
                elif p.suffix == ".parquet":
                    pd.read_parquet(p)
                elif p.suffix == ".yaml":
                    yaml.safe_load(p.read_text())
                elif p.suffix == ".tsv":
                    text = p.read_text()
                    assert text.endswith("\n"), "a row cut short"
                    pd.read_csv(p, sep="\t")
            except Exception as e:  # noqa: BLE001 - any failure to read is the finding
                broken.append(f"{rel}: {type(e).__name__}: {e}")
    assert not leftovers, f"scratch files left: {leftovers}"
    assert not broken, "half-written files:\n" + "\n".join(broken)


def tsvs(repo: Path, task: str) -> dict[str, bytes]:
    folder = repo / "metrics" / task / "train" / "plots" / "metrics"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tsv"))}


def results(repo: Path, task: str) -> dict:
    """What a finished train + evaluate leaves, for comparing two runs."""
    model = torch.load(repo / "models" / task / "model.pt", map_location="cpu", weights_only=True)
    out = {
        "state_dict": model["state_dict"],
        "meta": model["meta"],
        "tsv": tsvs(repo, task),
        **{
            rel: (repo / "metrics" / task / rel).read_bytes()
            for rel in ("train/metrics.json", "metrics.json")
        },
    }
    return out


def assert_same_results(got: dict, want: dict) -> None:
    assert got["state_dict"].keys() == want["state_dict"].keys()
    different = [
        k
        for k, v in want["state_dict"].items()
        if v.dtype != got["state_dict"][k].dtype or not torch.equal(v, got["state_dict"][k])
    ]
    assert not different, f"weights differ from the uninterrupted run's: {different}"
    assert got["meta"] == want["meta"]
    for rel in ("train/metrics.json", "metrics.json"):
        assert got[rel] == want[rel], f"{rel}:\n{got[rel].decode()}\n!=\n{want[rel].decode()}"
    assert got["tsv"] == want["tsv"]


def assert_one_row_per_epoch(repo: Path, task: str, epochs: int) -> None:
    files = tsvs(repo, task)
    assert set(files) == {"train_loss.tsv", "val_loss.tsv", "val_acc.tsv", "lr.tsv"}
    for name in files:
        table = pd.read_csv(
            repo / "metrics" / task / "train" / "plots" / "metrics" / name, sep="\t"
        )
        assert table["step"].tolist() == list(range(epochs)), name


# ---------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """task → a repo copy with PARAMS, reproduced up to validate@task (made once, then cloned)."""
    made: dict[str, Path] = {}

    def get(task: str) -> Path:
        if task not in made:
            repo = copy_repo(tmp_path_factory.mktemp(f"validated-{task}"))
            set_params(repo, PARAMS[task])
            run(repo, "dvc", "repro", f"validate@{task}", timeout=300)
            made[task] = repo
        return made[task]

    return get


@pytest.fixture(scope="module")
def uninterrupted(validated, tmp_path_factory):
    """task → results() of train + evaluate run start to finish, once."""
    made: dict[str, dict] = {}

    def get(task: str) -> dict:
        if task not in made:
            repo = clone(validated(task), tmp_path_factory.mktemp(f"uninterrupted-{task}") / "repo")
            out = run(repo, "dvc", "repro", f"evaluate@{task}", timeout=600)
            assert "resuming" not in out.stderr
            assert_one_row_per_epoch(repo, task, PARAMS[task][f"{task}.train.epochs"])
            made[task] = results(repo, task)
        return made[task]

    return get


# ---------------------------------------------------------------- training


def tear_dvclive_files(repo: Path, task: str) -> None:
    """Leave DVCLive's files as a kill inside its (non-atomic) writes at the end of an epoch
    leaves them, on top of a checkpoint that already counts that epoch: its row missing from
    some .tsv files (a kill after last.pt was saved, before DVCLive wrote), cut mid-row in
    another (a kill inside an append), and metrics.json cut mid-write."""
    folder = repo / "metrics" / task / "train"
    rows = {
        name: (folder / "plots" / "metrics" / name).read_text().splitlines(keepends=True)
        for name in ("train_loss.tsv", "val_acc.tsv", "val_loss.tsv", "lr.tsv")
    }
    (folder / "plots" / "metrics" / "val_acc.tsv").write_text(
        "".join(rows["val_acc.tsv"][:-1]) + rows["val_acc.tsv"][-1][:3]
    )
    for name in ("val_loss.tsv", "lr.tsv"):
        (folder / "plots" / "metrics" / name).write_text("".join(rows[name][:-1]))
    summary = (folder / "metrics.json").read_text()
    (folder / "metrics.json").write_text(summary[: len(summary) // 2])


# Image with SIGKILL is left out for the suite's time (46 s): the kill, the torn DVCLive
# files and the resume are the shared trainer's, which tabular's SIGKILL case runs.
@pytest.mark.parametrize(
    "task,sig",
    [("tabular", signal.SIGTERM), ("tabular", signal.SIGKILL), ("image", signal.SIGTERM)],
    ids=["tabular-SIGTERM", "tabular-SIGKILL", "image-SIGTERM"],
)
def test_killed_training_resumes_to_the_uninterrupted_result(
    task, sig, validated, uninterrupted, spawn, tmp_path
):
    """Kill `dvc repro train@<task>` mid-epoch: nothing under models/, metrics/, data/ is
    half-written and last.pt is intact; `dvc repro evaluate@<task>` then resumes after the
    last checkpointed epoch and ends bit-identical to an uninterrupted run, with exactly one
    DVCLive row per epoch. After SIGKILL, DVCLive's files are additionally torn as a kill
    in their non-atomic end-of-epoch writes would leave them: the resumed run must rebuild
    them from the checkpoint (no step lost, none duplicated)."""
    want = uninterrupted(task)
    epochs = PARAMS[task][f"{task}.train.epochs"]
    repo = clone(validated(task), tmp_path / "repo")
    log = tmp_path / "killed.log"
    proc = spawn(repo, log, "dvc", "repro", f"train@{task}")
    # Printed after epoch KILL_AFTER's checkpoint and DVCLive rows are written; then wait
    # 40% of that epoch's duration (at most 0.3 s: epochs on a busy machine vary a lot), so
    # the signal lands in the next epoch's training, not inside a write.
    seconds = float(
        wait_for(log, rf"^epoch {KILL_AFTER}/{epochs} .*\((\d+\.\d+)s\)", proc).group(1)
    )
    time.sleep(min(0.4 * seconds, 0.3))
    kill_group(proc, sig)
    assert proc.returncode != 0

    killed = log.read_text()
    done = [int(n) for n in re.findall(rf"^epoch (\d+)/{epochs} ", killed, re.M)]
    assert done and done[-1] < epochs, (
        f"the run was not killed mid-training ({done}):\n{killed[-2000:]}"
    )
    assert_nothing_half_written(repo)
    last = torch.load(
        repo / "models" / task / "checkpoints" / "last.pt", map_location="cpu", weights_only=True
    )
    k = last["state"]["epoch"]
    assert (
        KILL_AFTER <= k in (done[-1], done[-1] + 1) and not last["finished"]
    )  # +1: killed before its log line
    assert not (repo / "models" / task / "model.pt").exists()
    if sig == signal.SIGKILL:
        tear_dvclive_files(repo, task)

    out = run(repo, "dvc", "repro", f"evaluate@{task}", timeout=600)
    log_text = out.stdout + out.stderr
    assert f"resuming from models/{task}/checkpoints/last.pt after epoch {k}" in log_text
    resumed = [int(n) for n in re.findall(rf"^epoch (\d+)/{epochs} ", log_text, re.M)]
    assert resumed == list(range(k + 1, epochs + 1)), log_text[-3000:]
    assert_nothing_half_written(repo)
    assert_one_row_per_epoch(repo, task, epochs)
    assert_same_results(results(repo, task), want)


# ---------------------------------------------------------------- atomic outputs


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def scratch(out_dir: Path) -> set[str]:
    """atomic_dir's temporary siblings of out_dir."""
    return {
        p.name
        for p in out_dir.parent.iterdir()
        if p.name.startswith(f".{out_dir.name}.") and TEMP.match(p.name)
    }


def big_penguins(repo: Path, rows: int = 300_000) -> None:
    """data/tabular/big.csv: penguins resampled with jitter, large enough that prepare
    spends a while writing its output."""
    src = pd.read_csv(repo / "data/tabular/penguins.csv")
    rng = np.random.default_rng(0)
    big = src.sample(rows, replace=True, random_state=0).reset_index(drop=True)
    for col in big.select_dtypes("number"):
        big[col] = (big[col] + rng.normal(0, 0.5, rows)).round(2)
    big.to_csv(repo / "data/tabular/big.csv", index=False)


def test_killed_prepare_leaves_the_old_or_the_new_output_and_no_scratch_behind(spawn, tmp_path):
    """SIGKILL `python -m stages prepare tabular` (run by hand: `dvc repro` deletes outputs
    before it runs a stage) while atomic_dir writes data/prepared/tabular, several times at
    random points of the write: the folder must hold exactly the old files or exactly the
    new ones. The scratch folders those kills leave beside it are expected; the next
    complete run must remove them, and what DVC records as the output must be exactly
    what a run that was never killed produces."""
    repo = copy_repo(tmp_path / "repo")
    big_penguins(repo)
    set_params(repo, {"tabular.data.source": "data/tabular/big.csv", "seed": 1})
    run(repo, "dvc", "repro", "prepare@tabular", timeout=300)
    out_dir = repo / "data/prepared/tabular"
    old = tree_hashes(out_dir)

    reference = clone(repo, tmp_path / "reference")
    set_params(reference, {"seed": 2})  # another split: other bytes
    run(reference, "dvc", "repro", "prepare@tabular", timeout=300)
    new = tree_hashes(reference / "data/prepared/tabular")
    assert new.keys() == old.keys() and new != old

    set_params(repo, {"seed": 2})
    rnd = random.Random(0)
    inside = 0  # kills that hit the write (~0.1 s of prepare's ~3 s)
    for attempt in range(8):
        log = tmp_path / f"prepare-{attempt}.log"
        before = scratch(out_dir)
        proc = spawn(repo, log, "python", "-m", "stages", "prepare", "tabular")
        deadline = time.monotonic() + 120
        while not scratch(out_dir) - before and proc.poll() is None:  # until this run's write began
            assert time.monotonic() < deadline, "prepare never started writing"
            time.sleep(0.001)
        time.sleep(rnd.uniform(0, 0.05))
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            inside += bool(
                scratch(out_dir) - before
            )  # this kill left its scratch: it hit the write
        else:  # the poll missed the write on a busy machine: the run completed
            assert proc.returncode == 0, log.read_text()[-2000:]
        assert tree_hashes(out_dir) in (old, new), f"kill {attempt}: a mix of old and new files"
        if inside == 2:
            break
    assert inside >= 2, "the kills missed the write: the test tested nothing"
    assert len(scratch(out_dir)) == 1, "each run must remove the scratch earlier kills left"

    run(repo, "dvc", "repro", "prepare@tabular", timeout=300)
    assert tree_hashes(out_dir) == new
    assert scratch(out_dir) == set(), "scratch left after a clean run"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    ref_lock = yaml.safe_load((reference / "dvc.lock").read_text())
    outs = lock["stages"]["prepare@tabular"]["outs"]
    assert outs == ref_lock["stages"]["prepare@tabular"]["outs"]


def test_stale_scratch_is_removed_and_a_live_writers_is_spared(tmp_path):
    """atomic_path removes the temporary siblings killed writers left (named by their PID),
    spares those of a writer that is still running, and touches no other file's."""
    alive = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        names = {
            "dead": f".out.csv.{dead.pid}.abcd_123.tmp",
            "old_style": ".out.csv.k2j4h5g6.tmp",
            "alive": f".out.csv.{alive.pid}.abcd_123.tmp",
            "other_file": f".out.csv.gz.{dead.pid}.abcd_123.tmp",
            "other_dir": f".out.{dead.pid}.abcd_123.tmp",
        }
        for key, name in names.items():
            (tmp_path / name).mkdir() if key == "other_dir" else (tmp_path / name).write_text(key)
        with atomic_path(tmp_path / "out.csv") as tmp:
            tmp.write_text("new")
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {"out.csv", names["alive"], names["other_file"], names["other_dir"]}
        assert (tmp_path / "out.csv").read_text() == "new"
    finally:
        alive.kill()
        alive.wait()


def test_atomic_dir_puts_the_previous_output_back_after_a_kill_between_its_renames(tmp_path):
    """atomic_dir swaps with two renames (output → .NAME.old, new → output): a kill between
    them leaves no output. The next atomic_dir on that path restores the previous version
    first, so a run that then fails still leaves it in place."""
    out = tmp_path / "prepared"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("v1")
    os.replace(out, tmp_path / ".prepared.old")  # the state between the two renames
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("v2, cut short")
        raise RuntimeError("killed")
    assert {p.name for p in tmp_path.iterdir()} == {"prepared"}
    assert (out / "a.txt").read_text() == "v1"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("v3")
    assert {p.name for p in tmp_path.iterdir()} == {"prepared"} and (
        out / "a.txt"
    ).read_text() == "v3"
