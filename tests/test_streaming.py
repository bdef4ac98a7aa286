"""The streaming parts of the tabular pipeline: the training split read by row group per
rank (RowGroups), chunked validation adding up to one run, and infer in chunks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import ROOT, params_with, run_python
from torch.utils.data import DataLoader

from stages.core.expectations import run_suite
from stages.tabular import prepare
from stages.tabular.data import Preprocessor, read_split, sample_split, split_chunks
from stages.tabular.train import RowGroups, fit_preprocessor, tensors
from stages.tabular.validate import profile
from stages.tabular.validate import suite as tabular_suite


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """The penguins prepared, and the training split rewritten in row groups of 16 rows."""
    out = tmp_path_factory.mktemp("prepared")
    params = params_with({"tabular.data.source": str(ROOT / "data/tabular/penguins.csv")})
    schema = prepare.run(params, out_dir=str(out))
    table = pq.read_table(out / "train.parquet")
    pq.write_table(table, out / "groups.parquet", row_group_size=16)
    return out, schema


def stream(split, rank=0, world=2, epoch=0, batch_size=8):
    out, schema = split
    types = {f.name: f.type for f in schema.features}
    ds = RowGroups(
        out / "groups.parquet",
        fit_preprocessor(out / "groups.parquet", types),
        schema,
        None,
        seed=3,
        batch_size=batch_size,
        rank=rank,
        world_size=world,
    )
    ds.set_epoch(epoch)
    return ds


def features(ds, **loader) -> torch.Tensor:
    """The stream's features as the trainer's DataLoader takes them (whole batches)."""
    batches = [x for x, _ in DataLoader(ds, batch_size=None, **loader)]
    assert {len(b) for b in batches[:-1]} <= {ds.batch_size} and 0 < len(
        batches[-1]
    ) <= ds.batch_size
    assert len(batches) == len(ds)
    return torch.cat(batches)


def test_ranks_get_equal_shares_that_cover_every_row(split):
    out, schema = split
    n = pq.ParquetFile(out / "groups.parquet").metadata.num_rows
    assert pq.ParquetFile(out / "groups.parquet").num_row_groups > 10
    shares = [features(stream(split, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shares] == [-(-n // 3)] * 3  # equal: DDP steps in lockstep
    everything = torch.cat(shares)
    whole = tensors(out / "groups.parquet", stream(split).pre, schema, None).tensors[0]
    assert len(torch.unique(everything, dim=0)) == len(
        torch.unique(whole, dim=0)
    )  # all rows, padding repeats some


def test_order_is_fixed_by_seed_and_epoch_and_shuffled_across_row_groups(split):
    a, again, other = (features(stream(split, epoch=e)) for e in (0, 0, 1))
    assert torch.equal(a, again)
    assert not torch.equal(a, other)
    ds = stream(split, world=1)
    first = [ds.groups[g][1] for g, _, _ in ds._pieces()][:5]
    assert first != sorted(first)  # row groups in a shuffled order, not file order


def test_batches_hold_the_rows_in_stream_order_across_row_groups(split):
    """Batches of 5 cut from row groups of 16: the rows, in the order _pieces gives them,
    exactly as preprocessing them one group at a time gives them."""
    ds = stream(split, rank=1, world=2, batch_size=5)
    expected = torch.cat(
        [
            torch.from_numpy(
                ds.pre.transform(
                    pq.ParquetFile(ds.groups[g][0])
                    .read_row_group(ds.groups[g][1])
                    .to_pandas()
                    .take(perm[part])
                )
            )
            for g, perm, part in ds._pieces()
        ]
    )
    assert torch.equal(features(ds), expected)


def test_loader_workers_see_the_one_process_order(split):
    ds = stream(split, batch_size=8)
    assert torch.equal(features(ds), features(ds, num_workers=2))


def test_preprocessor_fitted_column_by_column_equals_one_fit(split):
    out, schema = split
    types = {f.name: f.type for f in schema.features}
    assert fit_preprocessor(out / "train.parquet", types) == Preprocessor.fit(
        pd.read_parquet(out / "train.parquet"), types
    )


def test_validation_in_chunks_adds_up_to_one_run(split):
    out, schema = split
    suite = tabular_suite(profile(out / "train.parquet", schema), schema, 0.5, 0.9999)
    test = pd.read_parquet(out / "test.parquet")
    test.loc[test.index[[2, 40]], "bill_length_mm"] = 5000.0
    test.loc[test.index[:30], "flipper_length_mm"] = (
        np.nan
    )  # fails `mostly` only on the whole table
    bad = out / "bad.parquet"
    pq.write_table(pa.Table.from_pandas(test), bad, row_group_size=25)
    whole = run_suite(suite, {"t": test})["tables"]["t"]
    chunked = run_suite(suite, {"t": lambda: split_chunks(bad, 25)})["tables"]["t"]
    assert chunked["rows"] == whole["rows"] == len(test)
    for a, b in zip(whole["results"], chunked["results"], strict=False):
        assert (a["expectation"], a["column"], a["success"]) == (
            b["expectation"],
            b["column"],
            b["success"],
        )
        assert a.get("unexpected_count") == b.get("unexpected_count")
        assert a.get("sample_rows") == b.get("sample_rows")
    assert not whole["success"]


def test_a_sample_of_a_split_is_every_kth_row(split):
    out, _ = split
    path, cols = out / "groups.parquet", ["bill_length_mm", "island"]
    whole = read_split(path, cols)
    same, step = sample_split(path, cols, len(whole))
    assert step == 1 and same.equals(whole)
    sample, step = sample_split(path, cols, 100)  # row groups of 16: every 3rd row of each
    assert step == -(-len(whole) // 100) == 3
    expected = pd.concat([whole.iloc[i : i + 16].iloc[::3] for i in range(0, len(whole), 16)])
    assert sample.equals(expected)


def test_evaluate_in_chunks_scores_as_in_one_pass(served_repo, tmp_path):
    """The tabular evaluate reads the test split in chunks: chunks of 7 rows give the metrics
    and plots of one chunk, the HistGradientBoosting baseline's included."""
    code = f"""
import json
from pathlib import Path
from stages.core.params import load_params
from stages.tabular import evaluate

one = evaluate.run(load_params(), Path({str(tmp_path / "one")!r}))
evaluate.CHUNK_ROWS = 7
chunked = evaluate.run(load_params(), Path({str(tmp_path / "chunked")!r}))
assert one == chunked and one["baseline_hgb"] and one["test_rows"] > 7, (one, chunked)
"""
    run_python(served_repo, code)
    for f in (tmp_path / "one").rglob("*.json"):
        if f.name == "cost.json":  # wall times: the one file two identical runs cannot share
            continue
        assert f.read_text() == (tmp_path / "chunked" / f.relative_to(tmp_path / "one")).read_text()
