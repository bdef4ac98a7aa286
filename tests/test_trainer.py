"""The shared training loop: learning, resume after a stop, checkpoints, AMP policy."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import params_with
from torch.utils.data import TensorDataset

from stages.core import distributed
from stages.core.cli import StageError
from stages.core.distributed import (
    AmpPolicy,
    Runtime,
    amp_policy,
    configure_backends,
    seed_everything,
)
from stages.core.inference import cgroup_cpu_limit, physical_cores
from stages.core.trainer import (
    LoopConfig,
    classification_sums,
    fit,
    load_checkpoint,
    regression_sums,
    resumable,
)
from stages.tabular.model import MLP, build_model

CPU = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
BASE = dict(
    epochs=6,
    batch_size=16,
    lr=0.05,
    weight_decay=0.0,
    scheduler="cosine",
    step_size=2,
    gamma=0.5,
    grad_clip=1.0,
    grad_accum=1,
    amp="off",
    patience=0,
    monitor="val_loss",
    num_workers=0,
    device="cpu",
    nproc=1,
)


def blobs(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.5 + torch.nn.functional.one_hot(y, 4).float() * 3
    return TensorDataset(x, y)


def train(tmp_path, fingerprint="fp", stop_after_epoch=None, **over):
    seed_everything(0)
    model = MLP(4, [8], 3, dropout=0.2)  # dropout: resume must restore the RNG too
    cfg = LoopConfig(**{**BASE, **over})
    summary = fit(
        model,
        blobs(),
        blobs(60, seed=1),
        sums_fn=classification_sums,
        cfg=cfg,
        rt=CPU,
        seed=0,
        ckpt_dir=tmp_path,
        fingerprint=fingerprint,
        stop_after_epoch=stop_after_epoch,
    )
    return model, summary


def test_fit_learns_and_writes_checkpoints(tmp_path):
    model, summary = train(tmp_path)
    assert summary["epochs_run"] == 6
    assert summary["best_metrics"]["val_acc"] > 0.9
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["state"]["best_epoch"] + 1 == summary["best_epoch"]
    assert load_checkpoint(tmp_path / "last.pt")["finished"] is True


def test_resume_after_a_stop_gives_the_same_weights(tmp_path, capsys):
    straight, _ = train(tmp_path / "a")
    train(tmp_path / "b", stop_after_epoch=3)
    assert resumable(tmp_path / "b", "fp")
    resumed, summary = train(tmp_path / "b")
    assert "resuming from" in capsys.readouterr().err
    assert summary["epochs_run"] == 6
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_other_runs_and_finished_runs_start_fresh(tmp_path, capsys):
    train(tmp_path, stop_after_epoch=2)
    assert not resumable(tmp_path, "other params")
    train(tmp_path, fingerprint="other params", epochs=3)
    assert "resuming" not in capsys.readouterr().err
    assert not resumable(tmp_path, "other params")  # finished
    _, summary = train(tmp_path, fingerprint="other params", epochs=3)
    assert "resuming" not in capsys.readouterr().err and summary["epochs_run"] == 3


def test_early_stopping_on_a_stalled_metric(tmp_path):
    # lr 0: nothing improves after the first epoch, so patience 2 stops at epoch 3.
    _, summary = train(tmp_path, lr=0.0, patience=2, epochs=20, scheduler="none")
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 1


@pytest.mark.parametrize("scheduler", ["step", "plateau", "none"])
def test_schedulers_and_accumulation(tmp_path, scheduler):
    _, summary = train(tmp_path, scheduler=scheduler, grad_accum=2, epochs=3)
    assert summary["epochs_run"] == 3


def test_regression_loop(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    data = TensorDataset(x, x @ torch.tensor([1.0, -2.0, 0.5]))
    model = build_model({"name": "mlp", "n_in": 3, "hidden": [16], "n_out": 1, "dropout": 0.0})
    cfg = LoopConfig(**{**BASE, "monitor": "val_mae", "epochs": 30})
    summary = fit(
        model,
        data,
        data,
        sums_fn=regression_sums,
        cfg=cfg,
        rt=CPU,
        seed=0,
        ckpt_dir=tmp_path,
        fingerprint="r",
    )
    assert summary["best_metrics"]["val_mae"] < 0.5


def test_bf16_autocast_trains_on_cpu(tmp_path):
    _, fp32 = train(tmp_path / "fp32")
    _, bf16 = train(tmp_path / "bf16", amp="bf16")
    assert bf16["best_metrics"]["val_acc"] > 0.9
    assert abs(bf16["best_metrics"]["val_loss"] - fp32["best_metrics"]["val_loss"]) < 0.1


FP16 = AmpPolicy(enabled=True, dtype=torch.float16, scaler=True)
BF16 = AmpPolicy(enabled=True, dtype=torch.bfloat16, scaler=False)
OFF = AmpPolicy(enabled=False, dtype=torch.float32, scaler=False)


@pytest.mark.parametrize(
    "capability,cpu_bf16,want_cuda,want_cpu",
    [
        ((7, 5), False, FP16, OFF),  # Turing GPU, CPU without native bf16
        ((8, 0), False, BF16, OFF),  # Ampere: bf16 native, no loss scaling
        ((9, 0), True, BF16, BF16),  # Hopper; a CPU with AMX / AVX512-BF16
    ],
)
def test_amp_auto_follows_the_device(monkeypatch, capability, cpu_bf16, want_cuda, want_cpu):
    """The device capabilities are faked (no GPU here); tests/test_gpu.py runs them for real."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(distributed, "cpu_supports_bf16", lambda: cpu_bf16)
    assert amp_policy("auto", torch.device("cuda", 0)) == want_cuda
    assert amp_policy("auto", torch.device("cpu")) == want_cpu
    assert (
        amp_policy("fp16", torch.device("cuda", 0)) == FP16
    )  # asked for: honoured, with GradScaler


def test_amp_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_policy("off", cpu) == OFF
    assert amp_policy("fp16", cuda) == FP16  # fp16 needs GradScaler
    assert amp_policy("bf16", cpu) == BF16
    assert amp_policy("bf16", cuda) == BF16
    assert amp_policy("auto", cpu).enabled in (True, False)
    with pytest.raises(StageError, match="needs a CUDA device"):
        amp_policy("fp16", cpu)
    with pytest.raises(StageError, match="choose one of"):
        amp_policy("fp8", cpu)


def test_loop_config_from_the_typed_section():
    train = params_with({"tabular.train.lr": 0.5, "tabular.train.epochs": 4}).tabular.train
    cfg = LoopConfig.from_params(train, batch_size=8)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.monitor) == (0.5, 4, 8, train.monitor)
    # a bad value never reaches the loop: the schema names it
    with pytest.raises(StageError, match="tabular.train.scheduler"):
        params_with({"tabular.train.scheduler": "linear"})


def test_unknown_monitor_lists_choices(tmp_path):
    with pytest.raises(StageError, match="monitor is 'val_f1'.*val_acc"):
        train(tmp_path, monitor="val_f1", epochs=1)


def test_model_forward_shapes_and_no_nans():
    model = build_model(
        {"name": "mlp", "n_in": 5, "hidden": [8, 4], "n_out": 3, "dropout": 0.1}
    ).eval()
    out = model(torch.randn(7, 5))
    assert out.shape == (7, 3) and torch.isfinite(out).all()


def test_backends_tf32_on_cuda_threads_on_cpu(monkeypatch):
    """TF32 flags are plain switches (settable without a GPU); CPU threads follow physical_cores."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_num_threads(),
    )
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert configure_backends(torch.device("cuda", 0)) == {"tf32": True}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        monkeypatch.setattr("stages.core.inference.physical_cores", lambda: 6)
        assert configure_backends(torch.device("cpu"), local_world_size=2) == {
            "threads": 3
        }  # 6 cores, 2 ranks
        assert torch.get_num_threads() == 3
        # On the numeric baseline (the dispatcher's pin): its fixed count, whatever the cores.
        monkeypatch.setenv("STAGES_NUMERICS", "baseline")
        assert configure_backends(torch.device("cpu"), local_world_size=2) == {
            "threads": 1,
            "deterministic": True,
        }
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_num_threads(saved[2])


CPUINFO = "".join(
    f"processor\t: {i}\nphysical id\t: 0\ncore id\t\t: {i // 2}\n\n" for i in range(8)
)  # 4 cores × 2


@pytest.mark.parametrize(
    "files,allowed,want",
    [
        ({}, set(range(8)), 4),  # no limit: 4 physical cores
        ({"cpu.max": "max 100000\n"}, set(range(8)), 4),  # v2, unlimited
        ({"cpu.max": "200000 100000\n"}, set(range(8)), 2),  # v2: 2 CPUs of quota
        ({"cpu.max": "150000 100000\n"}, set(range(8)), 1),  # 1.5 CPUs: one unthrottled thread
        (
            {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"},
            set(range(8)),
            3,
        ),  # v1
        (
            {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
            set(range(8)),
            4,
        ),  # v1, unlimited
        ({}, {0, 1, 2}, 2),  # affinity: CPUs 0-2 are cores 0 and 1
        ({"cpu.max": "800000 100000\n"}, {6}, 1),  # quota above affinity: affinity rules
    ],
)
def test_physical_cores_honours_cgroup_quota_and_affinity(tmp_path, files, allowed, want):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    for rel, text in files.items():
        (tmp_path / "cg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / rel).write_text(text)
    assert physical_cores(tmp_path / "cpuinfo", tmp_path / "cg", allowed) == want


def test_physical_cores_on_this_machine():
    n = physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    assert limit is None or n <= max(1, int(limit))


def test_compile_trains_and_checkpoints_plain_names(tmp_path, monkeypatch):
    """train.compile runs the loop through torch.compile (TorchDynamo traces the model; the
    eager backend here, as inductor's C++ compile takes minutes on 2 busy cores: the GPU test
    runs inductor); the checkpoint holds the plain module's names, so evaluate and export
    load it as before."""
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or real(m, backend="eager"))
    model, summary = train(tmp_path, compile=True, epochs=2)
    assert summary["best_metrics"]["val_acc"] > 0.5
    names = set(load_checkpoint(tmp_path / "best.pt")["model"])
    assert names == set(model.state_dict()) and not any("_orig_mod" in n for n in names)
    assert compiled == [model]
