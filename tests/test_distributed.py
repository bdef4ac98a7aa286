"""Multi-process training on the CPU (gloo): DDP under torchrun, 2 nodes on one machine, and
the `train.nproc` stage path. Every launch has a timeout and is killed, with its workers,
when it runs over or a peer fails, so that nothing here can hang CI."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import ROOT, set_params, stage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORKER = ROOT / "tests" / "ddp_worker.py"
EPOCHS = 3  # tests/ddp_worker.py EPOCHS
LAUNCH_TIMEOUT = 300  # seconds for one torchrun launch (they take ~10 s)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@dataclass
class Launch:
    returncode: int | None
    log: str


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a launcher and every process under it (torchrun puts its workers in new sessions)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.kill()
    for c in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            c.kill()
    proc.wait(timeout=10)  # reaped by Popen, so that its returncode says it was killed
    psutil.wait_procs(children, timeout=10)


def launch(
    cmds: list[list[str]],
    cwd: Path,
    log_dir: Path,
    env: dict[str, str] | None = None,
    timeout: float = LAUNCH_TIMEOUT,
) -> list[Launch]:
    """Start the commands concurrently and wait for all of them. If one fails or time runs
    out, the others are killed (a lone node would wait for its peer until rendezvous times out)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = [log_dir / f"launch{i}.log" for i in range(len(cmds))]
    procs = []
    try:
        for cmd, log in zip(cmds, logs, strict=False):
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(
                        cmd,
                        cwd=cwd,
                        env=env or worker_env(),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_tree(p)
    return [Launch(p.returncode, log.read_text()) for p, log in zip(procs, logs, strict=False)]


def assert_ok(results: list[Launch]) -> None:
    for i, r in enumerate(results):
        why = " (killed: timed out, or a peer failed)" if r.returncode == -9 else ""
        assert r.returncode == 0, f"launcher {i} exited {r.returncode}{why}:\n{r.log[-6000:]}"


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: tensors differ: {different}"


def tsv_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1:] if line.strip()]


def epoch_lines(log: str) -> collections.Counter:
    return collections.Counter(
        re.findall(r"^(?:\[[^\]]*\]:?\s*)?epoch (\d+/\d+) ", log, flags=re.M)
    )


@pytest.fixture(scope="module")
def standalone(tmp_path_factory) -> tuple[Path, Launch]:
    """One `torchrun --standalone --nproc-per-node=2` run of tests/ddp_worker.py."""
    out = tmp_path_factory.mktemp("ddp_standalone")
    [result] = launch(
        [[*TORCHRUN, "--standalone", "--nproc-per-node=2", str(WORKER), str(out / "run")]],
        cwd=ROOT,
        log_dir=out,
    )
    return out / "run", result


def test_ddp_two_processes_agree_and_log_once(standalone):
    out, result = standalone
    assert_ok([result])
    rank0, rank1, init = load(out / "rank0.pt"), load(out / "rank1.pt"), load(out / "init.pt")
    assert_same_weights(rank0, rank1, "rank 0 and rank 1 final weights")
    unchanged = [k for k in init if torch.equal(init[k], rank0[k])]
    assert not unchanged, f"training did not change: {unchanged}"

    s0, s1 = (json.loads((out / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 and s0["world_size"] == 2 and s0["epochs_run"] == EPOCHS

    # One DVCLive writer (rank 0): one row per epoch, not one per rank.
    live = out / "live"
    tsvs = sorted((live / "plots" / "metrics").glob("*.tsv"))
    assert {p.stem for p in tsvs} == {"train_loss", "val_loss", "val_acc", "lr"}
    for p in tsvs:
        rows = tsv_rows(p)
        assert [r["step"] for r in rows] == [str(i) for i in range(EPOCHS)], (
            f"{p.name}:\n{p.read_text()}"
        )
    assert [p.relative_to(live) for p in live.rglob("metrics.json")] == [Path("metrics.json")]
    assert json.loads((live / "metrics.json").read_text())["step"] == EPOCHS - 1

    # Only rank 0 logs.
    assert epoch_lines(result.log) == {f"{k}/{EPOCHS}": 1 for k in range(1, EPOCHS + 1)}, result.log


def test_two_nodes_on_one_machine_match_standalone(standalone, tmp_path):
    """Two torchrun launchers (1 process each) meeting through c10d rendezvous train exactly as
    one launcher with 2 processes: same world size and seed, so bit-identical weights."""
    ref, ref_result = standalone
    if ref_result.returncode != 0:
        pytest.fail(f"the standalone reference run failed:\n{ref_result.log[-4000:]}")
    port, rdzv_id = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    cmds = [
        [
            *TORCHRUN,
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={rdzv_id}",
            str(WORKER),
            str(out),
        ]
        for node in (0, 1)
    ]
    results = launch(cmds, cwd=ROOT, log_dir=tmp_path)
    assert_ok(results)
    for name in ("init.pt", "rank0.pt", "rank1.pt"):
        assert_same_weights(load(out / name), load(ref / name), f"2 nodes vs standalone: {name}")
    assert sum(epoch_lines(r.log)[f"{EPOCHS}/{EPOCHS}"] for r in results) == 1


def test_empty_validation_shard(tmp_path):
    """1 validation row, 2 ranks: rank 1 scores nothing but must still join the all-reduce
    (it used to crash on torch.stack([])). BatchNorm: DDP's buffer sync in the first eval
    forward is a collective too, so the empty rank has to make that call as well."""
    out = tmp_path / "run"
    [result] = launch(
        [
            [
                *TORCHRUN,
                "--standalone",
                "--nproc-per-node=2",
                str(WORKER),
                str(out),
                "--n-val=1",
                "--batchnorm",
            ]
        ],
        cwd=ROOT,
        log_dir=tmp_path,
    )
    assert_ok([result])
    s0, s1 = (json.loads((out / f"summary{r}.json").read_text()) for r in (0, 1))
    assert s0 == s1 and s0["epochs_run"] == EPOCHS
    assert s0["best_metrics"]["val_acc"] in (
        0.0,
        1.0,
    )  # one row: right or wrong, not averaged over 2
    rank0, rank1 = load(out / "rank0.pt"), load(out / "rank1.pt")
    # BatchNorm running stats are per rank by design; the parameters must agree.
    params = [
        k for k in rank0 if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert_same_weights({k: rank0[k] for k in params}, {k: rank1[k] for k in params}, "parameters")


def test_train_stage_with_nproc_2(repo, tmp_path, monkeypatch):
    """`train.nproc: 2` re-launches the stage under torchrun: one model, one DVCLive writer,
    and each epoch logged once (rank 0 only)."""
    set_params(repo, {"tabular.train.nproc": 2, "tabular.train.device": "cpu"})
    epochs = yaml.safe_load((repo / "params.yaml").read_text())["tabular"]["train"]["epochs"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    stage(repo, "prepare")
    stage(repo, "validate")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the copy's stages/, from the cwd
    [result] = launch(
        [[sys.executable, "-m", "stages", "train", "tabular"]],
        cwd=repo,
        log_dir=tmp_path / "logs",
        env=env,
    )
    assert_ok([result])

    model = torch.load(repo / "models/tabular/model.pt", map_location="cpu", weights_only=False)
    assert model["meta"]["train"]["epochs_run"] == epochs
    live = repo / "metrics/tabular/train"
    rows = tsv_rows(live / "plots/metrics/train_loss.tsv")
    assert [r["step"] for r in rows] == [str(i) for i in range(epochs)]
    assert yaml.safe_load((live / "params.yaml").read_text())["world_size"] == 2
    assert epoch_lines(result.log) == {f"{k}/{epochs}": 1 for k in range(1, epochs + 1)}, result.log
