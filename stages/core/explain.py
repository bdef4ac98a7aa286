"""Explanations, torch-free: per-column Shapley values of a model's answer for rows, and
permutation importance of columns for a metric. Any task's model fits: it is a function from
model inputs (float32 [K, F]) to values ([K, C]: class probabilities, or [K, 1] predictions),
and a column is a block of model-input indices (a one-hot or text block is one column).

Shapley values (Lundberg and Lee 2017, "interventional" form): the value of a coalition S of
columns is the mean answer over the background rows with the columns in S taken from the
row and the others from the background row. With M columns:
- M <= exact_columns: all 2^M coalitions, the exact Shapley values for that background;
- beyond: permutation sampling (Strumbelj and Kononenko 2014), antithetic pairs (a
  permutation and its reverse). Each permutation's marginal contributions sum to
  f(x) - mean f(background) exactly, so the estimate is additive by construction and
  unbiased; its error falls as 1 / sqrt(permutations) (docs/explain.md).
The row's answer = base_value + sum of its attributions, both ways (to float rounding).
The permutations are drawn once per call from a fixed seed: a row gets the same
attributions whatever else is in the request.
"""

from __future__ import annotations

from math import factorial

import numpy as np

# Model rows per onnxruntime run: big enough to amortise the call, small enough for cache.
CHUNK = 8192


def _values(f, x: np.ndarray, background: np.ndarray, blocks, masks: np.ndarray) -> np.ndarray:
    """v[i, s, :] = mean over background b of f(row i with the columns of masks[s] from the
    row, the others from b): [N, S, C]."""
    owner = np.zeros(x.shape[1], dtype=np.int64)  # model input index → column
    for j, idx in enumerate(blocks):
        owner[idx] = j
    take = masks[:, owner]  # [S, F]: this input comes from the row
    n, s, b = len(x), len(masks), len(background)
    z = np.where(take[None, :, None, :], x[:, None, None, :], background[None, None, :, :])
    z = z.reshape(n * s * b, x.shape[1]).astype(np.float32, copy=False)
    out = np.concatenate([f(z[i : i + CHUNK]) for i in range(0, len(z), CHUNK)])
    return out.reshape(n, s, b, -1).mean(axis=2)


def _exact(f, x, background, blocks) -> tuple[np.ndarray, np.ndarray]:
    m = len(blocks)
    codes = np.arange(2**m)
    masks = (codes[:, None] >> np.arange(m)) & 1 == 1  # [2^M, M]
    v = _values(f, x, background, blocks, masks)  # [N, 2^M, C]
    size = masks.sum(1)
    weight = np.array([factorial(k) * factorial(m - k - 1) / factorial(m) for k in range(m)])
    phi = np.zeros((len(x), m, v.shape[2]))
    for j in range(m):
        without = codes[~masks[:, j]]
        w = weight[size[without]][None, :, None]
        phi[:, j] = (w * (v[:, without | (1 << j)] - v[:, without])).sum(1)
    return v[:, 0], phi


def _sampled(f, x, background, blocks, permutations: int, seed: int):
    m = len(blocks)
    rng = np.random.default_rng(seed)
    half = [rng.permutation(m) for _ in range(max(1, permutations // 2))]
    perms = [p for q in half for p in (q, q[::-1])]  # antithetic pairs: less variance
    # The M+1 growing coalitions of each permutation, one after another.
    masks = np.zeros((len(perms) * (m + 1), m), dtype=bool)
    for k, p in enumerate(perms):
        for step in range(1, m + 1):
            masks[k * (m + 1) + step, p[:step]] = True
    v = _values(f, x, background, blocks, masks).reshape(len(x), len(perms), m + 1, -1)
    phi = np.zeros((len(x), m, v.shape[3]))
    gains = np.diff(v, axis=2)  # [N, P, M, C]: what the step's column added
    for k, p in enumerate(perms):
        phi[:, p] += gains[:, k]
    return v[:, 0, 0], phi / len(perms)


def shapley(
    f,
    x: np.ndarray,
    background: np.ndarray,
    blocks: list,
    target: np.ndarray | None = None,
    exact_columns: int = 10,
    permutations: int = 10,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(base_value [N], attributions [N, M]) of output `target[i]` of f (column 0 when None)
    for each row of x (model inputs [N, F]); blocks[j] = column j's input indices."""
    x, background = np.asarray(x, np.float32), np.asarray(background, np.float32)
    m = len(blocks)
    exact = m <= exact_columns
    coalitions = 2**m if exact else max(2, permutations) * (m + 1)
    # Rows at a time so that their coalitions x background stay near 16 CHUNKs in memory.
    step = max(1, 16 * CHUNK // (coalitions * len(background)))
    parts = [
        _exact(f, x[i : i + step], background, blocks)
        if exact
        else _sampled(f, x[i : i + step], background, blocks, permutations, seed)
        for i in range(0, len(x), step)
    ]
    base = np.concatenate([p[0] for p in parts])
    phi = np.concatenate([p[1] for p in parts])
    t = np.zeros(len(x), dtype=np.int64) if target is None else np.asarray(target)
    rows = np.arange(len(x))
    return base[rows, t], phi[rows, :, t]


def permutation_importance(
    score, x: np.ndarray, blocks: list, repeats: int, seed: int
) -> tuple[float, np.ndarray]:
    """(score(x), drops [M, repeats]): how much score(x) falls when column j's block is
    shuffled across rows (its link to the answer cut, its distribution kept; Breiman 2001),
    each repeat a fresh shuffle."""
    rng = np.random.default_rng(seed)
    full = score(x)
    drops = np.zeros((len(blocks), repeats))
    for r in range(repeats):
        for j, idx in enumerate(blocks):
            shuffled = x.copy()
            shuffled[:, idx] = x[rng.permutation(len(x))][:, idx]
            drops[j, r] = full - score(shuffled)
    return full, drops
