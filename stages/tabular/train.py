"""train: the MLP on the preprocessed features, through the shared loop (stages/core/job.py).

    python -m stages train tabular

The training split is streamed (RowGroups): each rank reads and preprocesses only its own
share of parquet row groups, one at a time, so memory per rank stays bounded whatever the
split's size. The preprocessor is fitted one column at a time; the validation split is held
as preprocessed float32 features.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, TensorDataset, get_worker_info

from stages.core import layout
from stages.core.cli import log
from stages.core.documents import Columns, Feature
from stages.core.files import write_timing
from stages.core.job import Job, train
from stages.core.schema import Params
from stages.core.trainer import regression_sums
from stages.tabular.budget import resolve
from stages.tabular.data import Preprocessor, feature_plan, read_split, split_chunks
from stages.tabular.model import build_model

TRAIN_TIME = "train-tabular"  # .cache/timings/train-tabular.json, read by evaluate


def targets(df: pd.DataFrame, schema: Columns, scaling: dict | None) -> torch.Tensor:
    target = df[schema.target]
    if schema.task == "classification":
        return torch.from_numpy(
            pd.Categorical(target, categories=schema.classes).codes.astype(np.int64)
        )
    return torch.from_numpy(
        ((target.to_numpy("float64") - scaling["mean"]) / scaling["std"]).astype(np.float32)
    )


def tensors(path: Path, pre: Preprocessor, schema: Columns, scaling: dict | None) -> TensorDataset:
    """A whole split as preprocessed tensors, read in chunks (float32 features only in memory)."""
    xs, ys = [], []
    for df in split_chunks(path, 1_000_000):
        xs.append(torch.from_numpy(pre.transform(df)))
        ys.append(targets(df, schema, scaling))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


class RowGroups(IterableDataset):
    """A prepared split streamed by parquet row group, sharded and shuffled as
    DistributedSampler would: every epoch ((seed, epoch) alone decide the order, so a resumed
    run repeats it) the row groups are put in a random order and each group's rows shuffled;
    rank r takes positions [r*n, (r+1)*n) of that sequence, n = ceil(rows / ranks), wrapping
    to the start to pad the last rank. Every rank has the same number of rows (DDP needs the
    same number of steps), and reads only the row groups its positions fall in. With
    DataLoader workers, worker w yields the rows of batches w, w+k, ...: the loader, which
    takes batches from its workers in turn, then sees exactly the one-process order."""

    def __init__(
        self,
        path: Path,
        pre: Preprocessor,
        schema: Columns,
        scaling: dict | None,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        import pyarrow.dataset as ds

        self.groups = [
            (f.path, rg.id, rg.num_rows)
            for f in sorted(
                ds.dataset(path, format="parquet").get_fragments(), key=lambda f: f.path
            )
            for rg in f.row_groups
            if rg.num_rows
        ]
        self.rows = sum(g[2] for g in self.groups)
        self.per_rank = math.ceil(self.rows / world_size)
        self.pre, self.schema, self.scaling, self.seed = pre, schema, scaling, seed
        self.batch_size, self.rank, self.epoch = batch_size, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """This rank's batches (what the DataLoader counts, as it takes them whole)."""
        return math.ceil(self.per_rank / self.batch_size)

    def _pieces(self):
        """(row group, its row permutation, slice of it) covering this rank's positions."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        sizes = np.array([self.groups[g][2] for g in order])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        lo = self.rank * self.per_rank
        for a, b in (
            (lo, min(lo + self.per_rank, self.rows)),
            (0, max(0, lo + self.per_rank - self.rows)),
        ):
            for i in np.flatnonzero((starts[:-1] < b) & (starts[1:] > a)):
                g = order[i]
                perm = np.random.default_rng([self.seed, self.epoch, g]).permutation(sizes[i])
                yield (
                    g,
                    perm,
                    slice(max(a, starts[i]) - starts[i], min(b, starts[i + 1]) - starts[i]),
                )

    def __iter__(self):
        """Whole batches (features, targets) of batch_size rows, the last one maybe shorter,
        cut from each row group's preprocessed rows across group boundaries: the same
        batches a DataLoader would collate from single rows, which cost most of an epoch
        (a 35M-row epoch at batch 4096: `python -m tools.bench --only large`)."""
        import pyarrow.parquet as pq

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        position, xs, ys = 0, [], []
        for g, perm, part in self._pieces():
            rows = perm[part]
            mine = ((position + np.arange(len(rows))) // self.batch_size) % workers == worker
            position += len(rows)
            if not mine.any():
                continue
            file, rg, _ = self.groups[g]
            df = pq.ParquetFile(file).read_row_group(rg).to_pandas().take(rows[mine])
            xs.append(torch.from_numpy(self.pre.transform(df)))
            ys.append(targets(df, self.schema, self.scaling))
            # This worker's rows are its batches end to end (batch w, w + k, ...): cut them.
            x, y = (torch.cat(xs), torch.cat(ys)) if len(xs) > 1 else (xs[0], ys[0])
            full = len(y) // self.batch_size * self.batch_size
            for start in range(
                0, full, self.batch_size
            ):  # copies: a view would hold the whole group
                yield (
                    x[start : start + self.batch_size].clone(),
                    y[start : start + self.batch_size].clone(),
                )
            xs, ys = [x[full:]], [y[full:]]
        if xs and len(ys[0]):
            yield xs[0].clone(), ys[0].clone()

    # The trainer's DataLoader takes the batches as they come (batch_size=None).
    batched = True


def fit_preprocessor(path: Path, features: list[Feature] | dict) -> Preprocessor:
    """Preprocessor.fit, one column in memory at a time (it fits each column on its own),
    merged in the order of its continuous block: numbers, dates, texts; then categories.
    `features`: columns.json's list, or {column: type}."""
    if isinstance(features, dict):
        features = [Feature(name=c, type=k) for c, k in features.items()]
    types, formats = feature_plan(features)
    parts = {c: Preprocessor.fit(read_split(path, [c]), {c: k}, formats) for c, k in types.items()}
    pre = Preprocessor(
        [c for c, k in types.items() if k == "numeric"],
        [c for c, k in types.items() if k == "categorical"],
        dates={c: formats[c] for c, k in types.items() if k == "datetime"},
    )
    for col_type in ("numeric", "datetime", "text", "categorical"):
        for c in (c for c, k in types.items() if k == col_type):
            pre.medians += parts[c].medians
            pre.means += parts[c].means
            pre.stds += parts[c].stds
            pre.categories.update(parts[c].categories)
            pre.texts.update(parts[c].texts)
    return pre


def data_files(path: Path) -> list[Path]:
    """A split's file, or its parts (Spark), in a fixed order: hashed into the run's fingerprint."""
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def job(params: Params) -> Job:
    import torch.distributed as dist

    p = params.tabular.train
    prepared = layout.prepared("tabular")
    schema = Columns.read(prepared / layout.columns("tabular").name)
    train_path, val_path = prepared / "train.parquet", prepared / "val.parquet"
    pre = fit_preprocessor(train_path, schema.features)
    scaling = None
    if schema.task == "regression":
        t = read_split(train_path, [schema.target])[schema.target]
        scaling = {"mean": float(t.mean()), "std": float(t.std(ddof=0)) or 1.0}
    n_out = len(schema.classes) if schema.task == "classification" else 1
    classify = schema.task == "classification"
    arch = {
        "name": "net",
        "n_in": pre.n_features,
        "n_numeric": len(pre.numeric),
        "hidden": list(p.hidden),
        "n_out": n_out,
        "dropout": float(p.dropout),
        "embedding": int(p.embedding),
        "ensemble": int(p.ensemble),
        "classify": classify,
    }
    ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Job(
        build_model(arch),
        arch,
        RowGroups(train_path, pre, schema, scaling, params.seed, p.batch_size, *ranks),
        tensors(val_path, pre, schema, scaling),
        loss_sums(classify, float(p.label_smoothing)),
        data_files(train_path) + data_files(val_path),
        {"preprocessor": pre.to_dict(), "schema": schema.dump(), "target_scaling": scaling},
    )


def loss_sums(classify: bool, label_smoothing: float):
    """The loop's batch sums for this network: label smoothing while training only (the
    validation loss stays the plain cross-entropy that early stopping and tuning compare),
    and, for an ensemble in training mode ((batch, k, out)), the mean of the k members'
    losses."""

    def sums(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        k = out.shape[1] if out.dim() == 3 else 1
        if k > 1:
            out, y = out.reshape(-1, out.shape[-1]), y.repeat_interleave(k)
        if classify:
            smoothing = label_smoothing if torch.is_grad_enabled() else 0.0
            loss = torch.nn.functional.cross_entropy(
                out.float(), y, reduction="sum", label_smoothing=smoothing
            )
            result = {"loss": loss, "acc": (out.argmax(1) == y).sum()}
        else:
            result = regression_sums(out, y)
        result = {name: v / k for name, v in result.items() if name != "count"}
        return {**result, "count": torch.tensor(len(y) // k)}

    return sums


def train_rows(path: Path) -> int:
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").count_rows()


def resolved_params(params: Params) -> Params:
    """params with tabular.train's `auto` batch size and epochs resolved for the prepared
    training split (budget.py); what the loop, the fingerprint and DVCLive see."""
    p = params.tabular.train
    rows = train_rows(layout.prepared("tabular") / "train.parquet")
    resolved = resolve(p, rows)
    if (resolved.batch_size, resolved.epochs) != (p.batch_size, p.epochs):
        log(f"{rows} training rows: batch_size {resolved.batch_size}, epochs {resolved.epochs}")
    tabular = params.tabular.model_copy(update={"train": resolved})
    return params.model_copy(update={"tabular": tabular})


def run(params: Params) -> None:
    """Trains, and writes the stage's wall time to .cache/timings/ (evaluate sets it beside
    the HGB baseline's fit time): never into an output, which must reproduce byte for byte."""
    t0 = time.perf_counter()
    params = resolved_params(params)
    train("tabular", params, job)
    if os.environ.get("RANK", "0") == "0":  # the launching process, or torchrun's rank 0
        p = params.tabular.train
        write_timing(
            TRAIN_TIME,
            {
                "seconds": round(time.perf_counter() - t0, 2),
                "rows": train_rows(layout.prepared("tabular") / "train.parquet"),
                "batch_size": p.batch_size,
                "epochs": p.epochs,
            },
        )
