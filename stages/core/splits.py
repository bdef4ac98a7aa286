"""Train/val/test splits fixed by the seed: stratified rows (tabular, image) and keys
(detection images, whose boxes stay together)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from stages.core.cli import StageError


def check_fractions(val: float, test: float) -> None:
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise StageError(
            f"split fractions val={val}, test={test} must be in (0, 1) and sum below 1"
        )


def split(
    df: pd.DataFrame,
    target: str,
    task: str,
    val: float,
    test: float,
    seed: int,
    source: str = "data",
) -> dict[str, pd.DataFrame]:
    """Train/val/test split, stratified on the target for classification, fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    check_fractions(val, test)
    strat = df[target] if task == "classification" else None
    try:
        rest, test_df = train_test_split(df, test_size=test, random_state=seed, stratify=strat)
        strat = rest[target] if task == "classification" else None
        train_df, val_df = train_test_split(
            rest, test_size=val / (1 - test), random_state=seed, stratify=strat
        )
    except ValueError as e:
        counts = df[target].value_counts()
        raise StageError(
            f"{source}: cannot split {len(df)} rows into train/val/test ({e}); "
            f"smallest class: {counts.idxmin()!r} with {counts.min()} rows"
        ) from None
    return {
        "train": train_df.sort_index(),
        "val": val_df.sort_index(),
        "test": test_df.sort_index(),
    }


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


# ---- the hash split: the same rows in every engine, without the table in memory ----
# A row's place is decided by (seed, line) alone: a 32-bit integer mix (Chris Wellons'
# "hash prospector" constants), written so that Spark SQL can compute it in 64-bit integers
# without overflow (every product stays below 2**59), and so that numpy computes it the same.
# The mix is a bijection on 32 bits, so distinct lines never tie.
MASK = 0xFFFFFFFF
MIX = 0x45D9F3B
TRAIN, VAL, TEST = 0, 1, 2
NAMES = ("train", "val", "test")


def _mix(x):
    x = (((x >> 16) ^ x) * MIX) & MASK
    x = (((x >> 16) ^ x) * MIX) & MASK
    return (x >> 16) ^ x


def row_hash(seed: int, lines: np.ndarray) -> np.ndarray:
    """uint32 hash of each line (< 2**32) under `seed`: _mix in place in 32 bits, where a
    product wraps around exactly as `& MASK` cuts it (a third of the time of 64 bits)."""
    x = lines.astype(np.uint32)
    x ^= np.uint32(_mix(np.uint64(seed & MASK)))
    for _ in range(2):
        x ^= x >> 16
        x *= np.uint32(MIX)
    x ^= x >> 16
    return x


def row_hash_sql(seed: int, line: str = "line") -> str:
    """The same hash as a Spark SQL expression over the bigint column `line`."""

    def mix(x: str) -> str:
        x = f"((shiftright({x}, 16) ^ {x}) * {MIX}) & {MASK}"
        x = f"((shiftright({x}, 16) ^ {x}) * {MIX}) & {MASK}"
        return f"(shiftright({x}, 16) ^ {x})"

    salt = int(_mix(np.uint64(seed & MASK)))
    return mix(f"(({line} ^ {salt}) & {MASK})")


def quotas(
    counts: dict, val: float, test: float, source: str, target: str | None, at_least: int = 1
) -> dict:
    """{group: (n_test, n_val)}: each group's rows in test and val (the rest train), rounded
    half up; one group (regression) or one per class (classification). Small tables: test
    and val get at least `at_least` rows each while train keeps half the table (rows taken
    from the groups with most train rows). Errors when a class is too small to stratify or a
    split would be empty."""
    check_fractions(val, test)
    total = sum(counts.values())
    if target is not None and min(counts.values()) < 2:
        small = min(counts, key=lambda c: (counts[c], str(c)))
        raise StageError(
            f"{source}: cannot split {total} rows into train/val/test (stratified on {target!r}, every "
            f"class needs at least 2 rows); smallest class: {small!r} with {counts[small]} rows"
        )
    out = {g: (math.floor(test * n + 0.5), math.floor(val * n + 0.5)) for g, n in counts.items()}
    out = _top_up(out, counts, at_least)
    if (
        not all(sum(q[i] for q in out.values()) for i in (0, 1))
        or sum(sum(q) for q in out.values()) >= total
    ):
        raise StageError(
            f"{source}: cannot split {total} rows into train/val/test with val={val}, test={test}: "
            "a split would be empty"
        )
    return out


def _top_up(out: dict, counts: dict, at_least: int) -> dict:
    out = {g: list(q) for g, q in out.items()}
    total = sum(counts.values())
    for i in (0, 1):
        while sum(q[i] for q in out.values()) < at_least:
            train = {g: counts[g] - sum(q) for g, q in out.items()}
            g = max(train, key=lambda g: (train[g], str(g)))
            if train[g] < 2 or sum(train.values()) - 1 < total / 2:
                break
            out[g][i] += 1
    return {g: tuple(q) for g, q in out.items()}


def hash_assign(keys: np.ndarray, groups: np.ndarray, quota: list[tuple[int, int]]) -> np.ndarray:
    """Split codes (TRAIN/VAL/TEST) per row: within each group, rows ranked by key (unique);
    the first n_test go to test, the next n_val to val. `groups` are codes into `quota`.
    A partition per group finds the two cut keys: no full sort."""
    cut_test, cut_val = np.full(len(quota), -1, np.int64), np.full(len(quota), -1, np.int64)
    for g, (n_test, n_val) in enumerate(quota):
        k = keys[groups == g] if len(quota) > 1 else keys
        ranks = [n - 1 for n in (n_test, n_test + n_val) if n]
        if ranks:
            k = np.partition(k, ranks)
            cut_test[g], cut_val[g] = (k[n - 1] if n else -1 for n in (n_test, n_test + n_val))
    codes = np.where(keys <= cut_val[groups], VAL, TRAIN).astype(np.uint8)
    codes[keys <= cut_test[groups]] = TEST
    return codes


def sklearn_assign(
    groups: np.ndarray, stratify: bool, val: float, test: float, seed: int, source: str
) -> np.ndarray:
    """The earlier split (scikit-learn's train_test_split, twice) as split codes per row."""
    frame = pd.DataFrame({"g": groups})
    parts = split(
        frame, "g", "classification" if stratify else "regression", val, test, seed, source
    )
    codes = np.full(len(groups), TRAIN, np.uint8)
    codes[parts["val"].index.to_numpy()] = VAL
    codes[parts["test"].index.to_numpy()] = TEST
    return codes
