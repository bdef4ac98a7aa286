"""The one training loop behind every torch model (tabular MLP, image CNNs).

Follows torchvision's reference recipe and nanoGPT's AMP path: DistributedSampler with
set_epoch, DDP on torchrun, a single autocast/GradScaler code path, gradient
accumulation with no_sync, clipping after unscale_, cosine/step/plateau schedules,
early stopping on a validation metric, and full-state checkpoints (model, optimizer,
scheduler, scaler, epoch, RNG) written atomically by rank 0 so a killed run resumes
where it stopped and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    Subset,
    TensorDataset,
)
from torch.utils.data.distributed import DistributedSampler

from stages.core.cli import StageError, log
from stages.core.distributed import AmpPolicy, Runtime, all_reduce_sums, amp_policy
from stages.core.files import atomic_path
from stages.core.schema import Device, Loop, Scheduler

LOWER_IS_BETTER = ("loss", "rmse", "mae", "error")


@dataclass(frozen=True)
class LoopConfig:
    """The `<task>.train` keys the loop reads (model keys such as `hidden` live beside them)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    scheduler: Scheduler
    step_size: int
    gamma: float
    grad_clip: float
    grad_accum: int
    amp: str
    patience: int
    monitor: str
    num_workers: int
    device: Device
    nproc: int
    compile: bool = (
        False  # torch.compile; a default, so that loops configured in code need not name it
    )

    @classmethod
    def from_params(cls, train: Loop, **changes) -> LoopConfig:
        """The loop's keys of a `<task>.train` section (the schema has checked them), with
        `changes` on top (a bench's amp mode, train's resolved `auto` sizes)."""
        return cls(**{f.name: getattr(train, f.name) for f in fields(cls)} | changes)

    @property
    def minimize(self) -> bool:
        return any(word in self.monitor for word in LOWER_IS_BETTER)


BatchSums = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def classification_sums(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
    return {"loss": loss, "acc": (logits.argmax(1) == y).sum(), "count": torch.tensor(len(y))}


def regression_sums(pred: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    err = pred.float().reshape(y.shape) - y
    return {"loss": (err**2).sum(), "mae": err.abs().sum(), "count": torch.tensor(len(y))}


def make_scheduler(opt: torch.optim.Optimizer, cfg: LoopConfig):
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min" if cfg.minimize else "max", factor=cfg.gamma, patience=cfg.step_size
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _gather_rng(rt: Runtime) -> list[torch.Tensor]:
    """Every rank's torch RNG state, so each rank's dropout stream resumes exactly."""
    state = torch.get_rng_state()
    if not rt.distributed:
        return [state]
    states = [None] * rt.world_size
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save, atomically and byte for byte reproducible: saved to a file, the archive's
    records are named after the file, and the atomic write's temporary name is random;
    saved to a buffer they are always named `archive/`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_checkpoint(path: Path) -> dict:
    # Checkpoints hold tensors, numbers and strings only: nothing to unpickle.
    return torch.load(path, map_location="cpu", weights_only=True)


def resumable(ckpt_dir: str | Path, fingerprint: str) -> bool:
    """True when ckpt_dir/last.pt is an unfinished run with this fingerprint."""
    last = Path(ckpt_dir) / "last.pt"
    if not last.exists():
        return False
    ck = load_checkpoint(last)
    # Checkpoints without the metrics history (older code) cannot rebuild the DVCLive log.
    return (
        ck.get("fingerprint") == fingerprint
        and not ck.get("finished")
        and "history" in ck.get("state", {})
    )


@torch.no_grad()
def _evaluate(model, loader, sums_fn: BatchSums, rt: Runtime, amp: AmpPolicy) -> dict[str, float]:
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for x, y in loader:
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with amp.autocast(rt.device):
            out = model(x)
        for k, v in sums_fn(out, y).items():
            totals[k] = totals.get(k, 0) + v.detach().double().cpu()
    if not totals:
        # With fewer validation rows than ranks, this rank's strided shard is empty; it
        # must still join the all-reduce below with the same keys (and make the same
        # first forward call, in which DDP may sync buffers), else it crashed on
        # torch.stack([]) and took the other ranks down. A zero-row batch sums to 0.
        full = getattr(loader.dataset, "dataset", loader.dataset)
        if len(full) == 0:
            raise StageError("the validation set is empty")
        x, y = (t[:0].to(rt.device) for t in collate_of(full)([full[0]]))
        with amp.autocast(rt.device):
            out = model(x)
        totals = {k: v.detach().double().cpu() for k, v in sums_fn(out, y).items()}
    reduced = all_reduce_sums(totals, rt)
    count = max(reduced.pop("count"), 1.0)
    return {k: v / count for k, v in reduced.items()}


def _loaders(
    train_set: Dataset,
    val_set: Dataset,
    model: torch.nn.Module,
    cfg: LoopConfig,
    rt: Runtime,
    seed: int,
) -> tuple[DistributedSampler, DataLoader, DataLoader]:
    # The sampler's shuffle depends on (seed, epoch) only, so a resumed run sees the same batches.
    # A stream (tabular's parquet row groups) shards and shuffles itself alike (set_epoch).
    sampler = (
        train_set
        if isinstance(train_set, IterableDataset)
        else DistributedSampler(
            train_set, num_replicas=rt.world_size, rank=rt.rank, shuffle=True, seed=seed
        )
    )
    # No persistent_workers: with them each worker seeds its RNG (augmentation) once, from a
    # draw on the main RNG when the loader is first iterated, and carries it across epochs;
    # a resumed run would draw at another point and augment differently from an uninterrupted
    # one (and shift the dropout stream). A fresh iterator per epoch seeds its workers from
    # the main RNG, which the checkpoint restores, so a resumed run repeats the same epochs.
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda")
    # A last batch of one sample crashes BatchNorm in training mode wherever the feature
    # map is 1×1 ("Expected more than 1 value per channel"): resnet18, mobilenet_v3_small,
    # efficientnet_b0 at image_size <= 32. Drop that one sample (a different one each
    # epoch: the order is shuffled); models without BatchNorm (the MLP) are unaffected.
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # A stream that cuts its own batches (tabular's row groups) is taken batch by batch.
    batched = getattr(train_set, "batched", False)
    drop_last = (
        not batched
        and has_bn
        and len(sampler) > cfg.batch_size
        and len(sampler) % cfg.batch_size == 1
    )
    loader = DataLoader(
        train_set,
        batch_size=None if batched else cfg.batch_size,
        drop_last=drop_last,
        collate_fn=None if batched else collate_of(train_set),
        **loader_kw,
        **({} if sampler is train_set else {"sampler": sampler}),
    )
    # Each rank scores its own strided shard; sums are all-reduced, so nothing is counted twice.
    shard = range(rt.rank, len(val_set), rt.world_size)
    if isinstance(
        val_set, TensorDataset
    ):  # tensors in memory: index a whole batch at once, not row by row
        val_loader = DataLoader(
            val_set,
            batch_size=None,
            sampler=BatchSampler(shard, cfg.batch_size * 2, False),
            **loader_kw,
        )
    else:
        val_loader = DataLoader(
            Subset(val_set, shard),
            batch_size=cfg.batch_size * 2,
            collate_fn=collate_of(val_set),
            **loader_kw,
        )
    return sampler, loader, val_loader


def collate_of(dataset: Dataset):
    """A dataset's own batch function (`collate`: e.g. augmenting a whole batch at once), else
    torch's default; looked up through Subset wrappers."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "collate", torch.utils.data.default_collate)


def _resume(ckpt_dir: Path, fingerprint: str, model, opt, sched, scaler, rt: Runtime, live) -> dict:
    """The loop state to start from: a fresh one, or that of ckpt_dir/last.pt when it is an
    unfinished run with this fingerprint (model, optimizer, scheduler, scaler and RNG restored)."""
    state = {
        "epoch": 0,
        "best": None,
        "best_epoch": -1,
        "bad_epochs": 0,
        "best_metrics": {},
        "history": [],
    }
    last = ckpt_dir / "last.pt"
    if not resumable(ckpt_dir, fingerprint):
        return state
    ck = load_checkpoint(last)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    scaler.load_state_dict(ck["scaler"])
    if len(ck["rng"]) == rt.world_size:
        torch.set_rng_state(ck["rng"][rt.rank])
    if rt.is_main:
        log(f"resuming from {last} after epoch {ck['state']['epoch']}")
    if live is not None:
        # DVCLive appends each epoch's rows after last.pt is saved, in plain (non-atomic)
        # writes: a kill can leave them a step short of the checkpoint, cut mid-row, or
        # metrics.json cut short (which DVCLive's own resume cannot even read). So the
        # checkpoint is the record: write every epoch it holds again, then go on.
        for step, metrics in enumerate(ck["state"]["history"]):
            _log_live(live, step, metrics)
        live.make_summary()
    return ck["state"]


def _train_one_epoch(
    net,
    model,
    loader,
    opt,
    scaler,
    sums_fn: BatchSums,
    cfg: LoopConfig,
    rt: Runtime,
    amp: AmpPolicy,
    desc: str,
) -> float:
    """One pass over this rank's shard; returns the mean training loss over all ranks."""
    net.train()
    # The loss is summed on the device and read once per epoch: a .cpu() per step forced a
    # sync on CUDA and cost a few small ops per step on CPU.
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=rt.device), 0
    batches = loader
    if rt.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        batches = tqdm(loader, desc=desc, leave=False)
    n_batches = len(loader)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        step_now = (i + 1) % cfg.grad_accum == 0 or i + 1 == n_batches
        # Skip the gradient all-reduce on accumulation steps; DDP syncs on the last one.
        sync = contextlib.nullcontext() if step_now or not rt.distributed else net.no_sync()
        with sync:
            with amp.autocast(rt.device):
                out = net(x)
            loss = sums_fn(out, y)["loss"]
            scaled = loss / (len(y) * cfg.grad_accum)
            (scaler.scale(scaled) if amp.scaler else scaled).backward()
        if step_now:
            if cfg.grad_clip > 0:
                if amp.scaler:
                    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if amp.scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        count += len(y)
    reduced = all_reduce_sums({"loss": loss_sum, "count": torch.tensor(float(count))}, rt)
    return reduced["loss"] / max(reduced["count"], 1.0)


def _checkpoint(
    ckpt_dir: Path,
    model,
    opt,
    sched,
    scaler,
    state: dict,
    fingerprint: str,
    finished: bool,
    improved: bool,
    rt: Runtime,
) -> None:
    """Full state to last.pt (and best.pt when the epoch improved); every rank must call it
    (the RNG states are gathered), rank 0 writes."""
    rng = _gather_rng(rt)
    if not rt.is_main:
        return
    ckpt = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "state": state,
        "rng": rng,
        "fingerprint": fingerprint,
        "finished": finished,
    }
    if improved:
        save_checkpoint(ckpt_dir / "best.pt", ckpt)
    # last.pt is written after best.pt: a kill between the two resumes this epoch again.
    save_checkpoint(ckpt_dir / "last.pt", ckpt)


def _log_live(live, step: int, metrics: dict[str, float]) -> None:
    live.step = step
    for k, v in metrics.items():
        live.log_metric(k, v)


def _record(state: dict, metrics: dict[str, float], cfg: LoopConfig, epoch: int) -> bool:
    """Add the epoch to the history and the early-stopping state; True if it is the best so far."""
    state["history"].append(metrics)
    value = metrics[cfg.monitor]
    improved = state["best"] is None or (
        value < state["best"] if cfg.minimize else value > state["best"]
    )
    if improved:
        state.update(best=value, best_epoch=epoch, bad_epochs=0, best_metrics=metrics)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    return improved


def _wrap(model: torch.nn.Module, cfg: LoopConfig, rt: Runtime):
    """The module that runs forward and backward: model on its device, in DDP under torchrun,
    compiled when train.compile is set."""
    model.to(rt.device)
    net = (
        DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None
        )
        if rt.distributed
        else model
    )
    if cfg.compile:
        # The compiled module runs forward and backward; `model` (sharing its parameters) is
        # what is checkpointed and exported, so state dicts keep their plain names.
        net = torch.compile(net)
    return net


def _epoch_metrics(
    train_loss, val: dict, lr: float, cfg: LoopConfig, epoch: int
) -> dict[str, float]:
    """An epoch's metrics (train_loss, val_*, lr), or StageError if the monitored one is
    missing or training diverged."""
    metrics = {"train_loss": train_loss}
    metrics.update({f"val_{k}": v for k, v in val.items()})
    metrics["lr"] = lr
    if cfg.monitor not in metrics:
        raise StageError(f"train.monitor is {cfg.monitor!r}; choose one of: {', '.join(metrics)}")
    if not all(math.isfinite(v) for v in metrics.values()):
        raise StageError(
            f"training diverged at epoch {epoch + 1} ({metrics}); lower train.lr or enable grad_clip"
        )
    return metrics


def _show_epoch(
    live, epoch: int, metrics: dict, cfg: LoopConfig, seconds: float, improved: bool
) -> None:
    """Rank 0: the epoch to DVCLive and a log line."""
    if live is not None:
        _log_live(live, epoch, metrics)
        live.next_step()
    shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    log(f"epoch {epoch + 1}/{cfg.epochs} {shown} ({seconds:.1f}s)" + (" *" if improved else ""))


def fit(
    model: torch.nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    *,
    sums_fn: BatchSums,
    cfg: LoopConfig,
    rt: Runtime,
    seed: int,
    ckpt_dir: str | Path,
    fingerprint: str,
    live=None,
    stop_after_epoch: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict:
    """Train `model` in place and leave the best weights in `ckpt_dir/best.pt`.

    Resumes from `ckpt_dir/last.pt` when it belongs to an unfinished run with the same
    `fingerprint` (params + data); `stop_after_epoch` ends early on purpose (tests).
    `live`: a DVCLive Live started afresh (resume=False); a resumed run rewrites the
    epochs it skips from the checkpoint's history. `on_epoch(epoch, metrics)` is called on
    every rank after each epoch's checkpoint (e.g. to report to a hyperparameter search,
    which may stop the run by raising).
    Returns a summary: best epoch, its metrics, epochs run, whether it stopped early.
    """
    ckpt_dir = Path(ckpt_dir)
    net = _wrap(model, cfg, rt)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg)
    amp = amp_policy(cfg.amp, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=amp.scaler)
    sampler, loader, val_loader = _loaders(train_set, val_set, model, cfg, rt, seed)
    state = _resume(ckpt_dir, fingerprint, model, opt, sched, scaler, rt, live)

    stopped_early = False
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        train_loss = _train_one_epoch(net, model, loader, opt, scaler, sums_fn, cfg, rt, amp, desc)
        val = _evaluate(net, val_loader, sums_fn, rt, amp)
        metrics = _epoch_metrics(train_loss, val, opt.param_groups[0]["lr"], cfg, epoch)
        improved = _record(state, metrics, cfg, epoch)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(metrics[cfg.monitor])
        else:
            sched.step()
        stopped_early = cfg.patience > 0 and state["bad_epochs"] >= cfg.patience
        finished = stopped_early or state["epoch"] == cfg.epochs
        _checkpoint(ckpt_dir, model, opt, sched, scaler, state, fingerprint, finished, improved, rt)
        if rt.is_main:
            _show_epoch(live, epoch, metrics, cfg, time.perf_counter() - t0, improved)
        if rt.distributed:
            dist.barrier()  # no rank starts the next epoch (or exits) before the checkpoint exists
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if stopped_early:
            if rt.is_main:
                log(f"early stop: {cfg.monitor} did not improve for {cfg.patience} epochs")
            break
        if stop_after_epoch is not None and state["epoch"] >= stop_after_epoch:
            break
    return {
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
        "stopped_early": stopped_early,
        "best_metrics": state["best_metrics"],
    }
