"""Benchmark section 4: the shared trainer vs a minimal hand-written loop."""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages.core.inference import physical_cores
from stages.core.params import load_params
from tools.bench.timing import Row, alternate, median, ratio_row


# ------------------------------------------------------------------ 4. training
def minimal_loop(model, train_set, val_set, cfg, amp: bool, seed: int) -> None:
    """What the shared trainer does, by hand: AdamW, autocast, clip, step; a validation pass per epoch."""
    import torch
    from torch.utils.data import DataLoader

    from stages.core.trainer import collate_of

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The dataset's own batch function (the image set augments and normalises whole batches).
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_of(train_set),
    )
    val_loader = DataLoader(
        val_set,
        batch_size=cfg.batch_size * 2,
        num_workers=cfg.num_workers,
        collate_fn=collate_of(val_set),
    )
    for _ in range(cfg.epochs):
        model.train()
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            for x, _ in val_loader:
                model(x)


def bench_sets(task: str, job, size: int | None) -> tuple:
    """(train, val) datasets for the bench: tabular in memory on both sides (the loop's
    overhead is measured, not parquet reading), the job's split, streamed or not, as tensors,
    resampled to `size` rows; image the first `size` items (all when None)."""
    import torch
    from torch.utils.data import TensorDataset

    train_set, val_set = job.train_set, job.val_set
    if task == "tabular":
        if not isinstance(train_set, TensorDataset):
            train_set = TensorDataset(
                *map(torch.cat, zip(*train_set, strict=False))
            )  # the stream's batches
        idx = torch.from_numpy(np.random.default_rng(0).integers(0, len(train_set), size))
        train_set = TensorDataset(*(t[idx] for t in train_set.tensors))
    elif size:
        train_set, val_set = (torch.utils.data.Subset(d, range(size)) for d in (train_set, val_set))
    return train_set, val_set


def contenders_of(task, job, data, base, params, amps, scratch) -> tuple[dict, Callable, Callable]:
    """({name: run}, run_fit, run_min): fit and the minimal loop at each AMP mode, and the
    loader alone, each from the same fresh copy of the job's model."""
    import torch
    from torch.utils.data import DataLoader

    from stages.core.distributed import Runtime
    from stages.core.trainer import LoopConfig, collate_of, fit

    rt = Runtime(0, 0, 1, torch.device("cpu"))
    pristine = copy.deepcopy(job.model)
    runs = itertools.count(1)

    def run_fit(amp, data=data):
        n = next(runs)
        cfg = LoopConfig.from_params(base, amp=amp)
        with contextlib.redirect_stderr(io.StringIO()):  # fit logs a line per epoch
            fit(
                copy.deepcopy(pristine),
                *data,
                sums_fn=job.sums_fn,
                cfg=cfg,
                rt=rt,
                seed=params.seed,
                ckpt_dir=scratch / f"ckpt-{task}-{n}",
                fingerprint=f"bench-{n}",
            )
        shutil.rmtree(scratch / f"ckpt-{task}-{n}", ignore_errors=True)

    def run_min(amp, data=data):
        cfg = LoopConfig.from_params(base, amp=amp)
        minimal_loop(copy.deepcopy(pristine), *data, cfg, amp != "off", params.seed)

    def loader_alone():  # what fit's loader does: batches, augmented and normalised (image)
        for _ in DataLoader(
            data[0],
            batch_size=base.batch_size,
            shuffle=True,
            num_workers=base.num_workers,
            collate_fn=collate_of(data[0]),
        ):
            pass

    contenders = {}
    for amp in amps:
        contenders[f"fit amp={amp}"] = lambda amp=amp: run_fit(amp)
        contenders[f"minimal amp={amp}"] = lambda amp=amp: run_min(amp)
    contenders["loader alone"] = loader_alone
    return contenders, run_fit, run_min


def task_rows(task: str, med: dict, amps: list, epochs: int, n: int, batch_size: int) -> tuple:
    """(rows, note) of one task from the median seconds of each contender."""
    rows, samples = [], epochs * n
    for amp in amps:
        rows.append(
            ratio_row(
                f"{task} training, amp {amp}",
                ("fit", samples / med[f"fit amp={amp}"], "samples/s"),
                ("minimal loop", samples / med[f"minimal amp={amp}"], "samples/s"),
                0.95,
            )
        )
    if len(amps) == 2:
        rows.append(
            ratio_row(
                f"{task} fit, bf16 vs fp32",
                ("bf16", samples / med["fit amp=bf16"], "samples/s"),
                ("fp32", samples / med["fit amp=off"], "samples/s"),
            )
        )
    steps = epochs * -(-n // batch_size)
    extra = {amp: (med[f"fit amp={amp}"] - med[f"minimal amp={amp}"]) / steps * 1e6 for amp in amps}
    note = (
        f"{task}: fit takes {', '.join(f'{v:+.0f} us (amp {a})' for a, v in extra.items())} per step "
        f"more than the minimal loop, on steps of {med['minimal amp=off'] / steps * 1e3:.2f} ms (fp32)"
    )
    epoch_s = med[f"fit amp={amps[0]}"] / epochs
    share = med["loader alone"] / epoch_s
    rows.append(
        Row(
            f"{task} DataLoader alone vs a fit epoch",
            ("loader", med["loader alone"], "s"),
            ("epoch", epoch_s, "s"),
            share,
            "loader <= 0.5x",
            share <= 0.5,
        )
    )
    return rows, note


def training(quick: bool, scratch: Path) -> dict:
    """samples/s of stages.core.trainer.fit vs minimal_loop, AMP (bf16) on and off; the loader alone."""
    import torch

    from stages.core.distributed import cpu_supports_bf16
    from stages.image.train import job as image_job
    from stages.tabular.train import job as tabular_job

    threads = physical_cores()
    torch.set_num_threads(threads)
    from stages.tabular.train import resolved_params  # `auto` batch size and epochs

    params = resolved_params(load_params())
    amps = ["bf16", "off"] if cpu_supports_bf16() else ["off"]
    rows, notes, details = [], [], {"threads": threads}
    epochs = 1
    # (task, job, training samples, rounds): the penguins' 223 rows are drawn with replacement
    # up to a size worth timing; the digits are used as they are. One epoch per run.
    plan = (
        ("tabular", tabular_job, 256 if quick else 20_000, 1 if quick else 7),
        ("image", image_job, 64 if quick else None, 1 if quick else 3),
    )
    for task, make_job, size, rounds in plan:
        job = make_job(params)
        train_set, val_set = bench_sets(task, job, size)
        base = getattr(params, task).train.model_copy(
            update={"epochs": epochs, "patience": 0, "device": "cpu", "nproc": 1}
        )
        contenders, run_fit, run_min = contenders_of(
            task, job, (train_set, val_set), base, params, amps, scratch
        )
        if not quick:  # warm-up (first-call costs of each path) on a few batches
            few = tuple(
                torch.utils.data.Subset(d, range(min(len(d), 2 * base.batch_size)))
                for d in (train_set, val_set)
            )
            for amp in amps:
                run_fit(amp, few)
                run_min(amp, few)
        # On a busy machine torch's threads wait for each other at every op and a run takes
        # ten times longer: then fewer rounds, so the bench stays within its 10 minutes.
        times = alternate(
            contenders, rounds, warmup=0, max_s=20 if task == "tabular" else 40, min_rounds=2
        )
        med = {k: median(v) for k, v in times.items()}
        details[task] = {"train_samples": len(train_set), "epochs": epochs, "seconds": med}
        more, note = task_rows(task, med, amps, epochs, len(train_set), base.batch_size)
        rows += more
        notes.append(note)
    notes.append(
        "same model and initial weights, data, batch size, AdamW, grad clipping and threads on both sides; "
        "both also score the validation split each epoch; fit also writes its checkpoints"
    )
    if len(amps) == 1:
        notes.append("this CPU has no native bf16: AMP rows skipped")
    return {"rows": rows, "notes": notes, "details": details}
