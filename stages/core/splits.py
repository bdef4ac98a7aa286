"""Train/val/test splits fixed by the seed: stratified rows (tabular, image) and keys
(detection images, whose boxes stay together)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from stages.core.common import StageError


def check_fractions(val: float, test: float) -> None:
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise StageError(f"split fractions val={val}, test={test} must be in (0, 1) and sum below 1")


def split(df: pd.DataFrame, target: str, task: str, val: float, test: float, seed: int,
          source: str = "data") -> dict[str, pd.DataFrame]:
    """Train/val/test split, stratified on the target for classification, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    check_fractions(val, test)
    strat = df[target] if task == "classification" else None
    try:
        rest, test_df = train_test_split(df, test_size=test, random_state=seed, stratify=strat)
        strat = rest[target] if task == "classification" else None
        train_df, val_df = train_test_split(rest, test_size=val / (1 - test), random_state=seed, stratify=strat)
    except ValueError as e:
        counts = df[target].value_counts()
        raise StageError(f"{source}: cannot split {len(df)} rows into train/val/test ({e}); "
                         f"smallest class: {counts.idxmin()!r} with {counts.min()} rows") from None
    return {"train": train_df.sort_index(), "val": val_df.sort_index(), "test": test_df.sort_index()}


def split_keys(keys: list[str], val: float, test: float, seed: int, source: str) -> dict[str, str]:
    """Random train/val/test assignment of keys, fixed by seed (detection has no single
    label to stratify on)."""
    if len(keys) < 3:
        raise StageError(f"{source}: {len(keys)} images cannot be split into train, val and test")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(keys))
    n_test, n_val = max(1, round(test * len(keys))), max(1, round(val * len(keys)))
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(keys) - n_test - n_val)
    return {keys[i]: names[j] for j, i in enumerate(order)}
