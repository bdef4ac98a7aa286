"""The shared training loop: learning, resume after a stop, checkpoints, AMP policy."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from stages.core.common import StageError
from stages.core.distributed import AmpPolicy, Runtime, amp_policy, seed_everything
from stages.tabular.model import MLP, build_model
from stages.core.trainer import LoopConfig, classification_sums, fit, load_checkpoint, regression_sums, resumable

CPU = Runtime(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
BASE = dict(epochs=6, batch_size=16, lr=0.05, weight_decay=0.0, scheduler="cosine", step_size=2, gamma=0.5,
            grad_clip=1.0, grad_accum=1, amp="off", patience=0, monitor="val_loss", num_workers=0,
            device="cpu", nproc=1)


def blobs(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) * 0.5 + torch.nn.functional.one_hot(y, 4).float() * 3
    return TensorDataset(x, y)


def train(tmp_path, fingerprint="fp", stop_after_epoch=None, **over):
    seed_everything(0)
    model = MLP(4, [8], 3, dropout=0.2)  # dropout: resume must restore the RNG too
    cfg = LoopConfig(**{**BASE, **over})
    summary = fit(model, blobs(), blobs(60, seed=1), sums_fn=classification_sums, cfg=cfg, rt=CPU, seed=0,
                  ckpt_dir=tmp_path, fingerprint=fingerprint, stop_after_epoch=stop_after_epoch)
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
    model = build_model({"kind": "mlp", "n_in": 3, "hidden": [16], "n_out": 1, "dropout": 0.0})
    cfg = LoopConfig(**{**BASE, "monitor": "val_mae", "epochs": 30})
    summary = fit(model, data, data, sums_fn=regression_sums, cfg=cfg, rt=CPU, seed=0, ckpt_dir=tmp_path,
                  fingerprint="r")
    assert summary["best_metrics"]["val_mae"] < 0.5


def test_bf16_autocast_trains_on_cpu(tmp_path):
    _, fp32 = train(tmp_path / "fp32")
    _, bf16 = train(tmp_path / "bf16", amp="bf16")
    assert bf16["best_metrics"]["val_acc"] > 0.9
    assert abs(bf16["best_metrics"]["val_loss"] - fp32["best_metrics"]["val_loss"]) < 0.1


def test_amp_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_policy("off", cpu) == AmpPolicy(enabled=False, dtype=torch.float32, scaler=False)
    assert amp_policy("fp16", cuda) == AmpPolicy(enabled=True, dtype=torch.float16, scaler=True)  # needs GradScaler
    assert amp_policy("auto", cuda) == AmpPolicy(enabled=True, dtype=torch.float16, scaler=True)
    assert amp_policy("bf16", cpu) == AmpPolicy(enabled=True, dtype=torch.bfloat16, scaler=False)
    assert amp_policy("auto", cpu).enabled in (True, False)
    with pytest.raises(StageError, match="needs a CUDA device"):
        amp_policy("fp16", cpu)
    with pytest.raises(StageError, match="choose one of"):
        amp_policy("fp8", cpu)


def test_loop_config_names_missing_and_bad_keys():
    with pytest.raises(StageError, match="missing: lr"):
        LoopConfig.from_params({k: v for k, v in BASE.items() if k != "lr"}, "tabular.train")
    with pytest.raises(StageError, match="scheduler is 'linear'"):
        LoopConfig.from_params({**BASE, "scheduler": "linear"}, "tabular.train")


def test_unknown_monitor_lists_choices(tmp_path):
    with pytest.raises(StageError, match="monitor is 'val_f1'.*val_acc"):
        train(tmp_path, monitor="val_f1", epochs=1)


def test_model_forward_shapes_and_no_nans():
    model = build_model({"kind": "mlp", "n_in": 5, "hidden": [8, 4], "n_out": 3, "dropout": 0.1}).eval()
    out = model(torch.randn(7, 5))
    assert out.shape == (7, 3) and torch.isfinite(out).all()
