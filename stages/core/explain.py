"""Explanations, torch-free: per-column Shapley values of a model's answer for rows, and
permutation importance of columns for a metric. Any task's model fits: it is a function from
model inputs (float32 [K, F]) to values ([K, C]: class probabilities, or [K, 1] predictions),
and a column is a block of model-input indices (a one-hot or text block is one column).

Shapley values (Lundberg and Lee 2017, "interventional" form): the value of a coalition S of
columns is the mean answer over the background rows with the columns in S taken from the
row and the others from the background row. With M columns:
- M <= exact_columns: all 2^M coalitions, the exact Shapley values for that background;
- beyond: sampling (Strumbelj and Kononenko 2014): `permutations` samples of (a random
  order of the columns, one background row), every background row equally often, in
  antithetic pairs (an order and its reverse). A sample's marginal contributions sum to
  f(x) - f(its background row) exactly, so the estimate is additive by construction and
  unbiased; its error falls as 1 / sqrt(permutations) (docs/explain.md).
Cost in model rows per explained row: 2^M x background rows exact, (M + 1) x permutations
sampled.
The row's answer = base_value + sum of its attributions, both ways (to float rounding).
The permutations are drawn once per call from a fixed seed: a row gets the same
attributions whatever else is in the request.
"""

from __future__ import annotations

from math import factorial

import numpy as np

# Model rows per onnxruntime run: big enough to amortise the call, small enough for cache.
CHUNK = 8192


def _values(f, x: np.ndarray, take: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """v[i, s, :] = mean over k of f(row i where take[s], else fill[s, k]): [N, S, C].
    take: [S, F] (the model input comes from the row); fill: [S or 1, K, F]."""
    n, s, k = len(x), len(take), fill.shape[1]
    z = np.where(take[None, :, None, :], x[:, None, None, :], fill[None])
    z = z.reshape(n * s * k, x.shape[1]).astype(np.float32, copy=False)
    out = np.concatenate([f(z[i : i + CHUNK]) for i in range(0, len(z), CHUNK)])
    return out.reshape(n, s, k, -1).mean(axis=2)


def _inputs(masks: np.ndarray, blocks: list, width: int) -> np.ndarray:
    """Coalitions of columns [S, M] → of model inputs [S, F]."""
    owner = np.zeros(width, dtype=np.int64)  # model input index → column
    for j, idx in enumerate(blocks):
        owner[idx] = j
    return masks[:, owner]


def _exact(f, x, background, blocks) -> tuple[np.ndarray, np.ndarray]:
    """Every coalition, each against the whole background."""
    m = len(blocks)
    codes = np.arange(2**m)
    masks = (codes[:, None] >> np.arange(m)) & 1 == 1  # [2^M, M]
    v = _values(f, x, _inputs(masks, blocks, x.shape[1]), background[None])  # [N, 2^M, C]
    size = masks.sum(1)
    weight = np.array([factorial(k) * factorial(m - k - 1) / factorial(m) for k in range(m)])
    phi = np.zeros((len(x), m, v.shape[2]))
    for j in range(m):
        without = codes[~masks[:, j]]
        w = weight[size[without]][None, :, None]
        phi[:, j] = (w * (v[:, without | (1 << j)] - v[:, without])).sum(1)
    return v[:, 0], phi


def _sampled(f, x, background, blocks, permutations: int, seed: int):
    """(permutation, background row) samples: every background row the same number of
    times, each with an antithetic pair of permutations (one and its reverse: their
    errors cancel in part). A sample walks its permutation, adding one column at a time."""
    m, nb = len(blocks), len(background)
    per_row = max(1, -(-permutations // (2 * nb)))  # antithetic pairs per background row
    half = np.random.default_rng(seed).permuted(np.tile(np.arange(m), (nb * per_row, 1)), axis=1)
    perms = np.stack([half, half[:, ::-1]], axis=1).reshape(-1, m)  # [P, M]: an order, its reverse
    rows = np.repeat(np.arange(nb), 2 * per_row)  # the background row of each sample
    rank = np.argsort(perms, axis=1)  # rank[k, j]: where column j comes in order k
    # The M+1 growing coalitions of each sample, one after another: step s holds the
    # columns ranked below s.
    masks = (rank[:, None, :] < np.arange(m + 1)[None, :, None]).reshape(-1, m)
    fill = np.repeat(background[rows], m + 1, axis=0)[:, None, :]
    v = _values(f, x, _inputs(masks, blocks, x.shape[1]), fill)
    v = v.reshape(len(x), len(perms), m + 1, -1)
    gains = np.diff(v, axis=2)  # [N, P, M, C]: gains[:, k, s] is what step s's column added
    phi = np.take_along_axis(gains, rank[None, :, :, None], axis=2).sum(1)  # by column
    # Each background row used equally often: the mean of f over them is the exact base.
    return v[:, :, 0].mean(1), phi / len(perms)


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
    per_row = 2**m * len(background) if exact else sampled_rows(m, len(background), permutations)
    # Rows at a time so that their model inputs stay near 16 CHUNKs in memory.
    step = max(1, 16 * CHUNK // per_row)
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


def sampled_rows(columns: int, background: int, permutations: int) -> int:
    """Model rows one explained row costs when sampled: (columns + 1) per sample, and
    `permutations` samples rounded up to whole antithetic pairs for every background row."""
    return 2 * background * max(1, -(-permutations // (2 * background))) * (columns + 1)


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
