"""Exact blocked top-k of dot-product scores in numpy.

Scores are computed one block of keys at a time with batched BLAS matmul, so
no more than ``block_bytes`` of scores exist at once. Within a block the top k
are found in two exact stages: the block's columns are split into ``GROUP``
interleaved groups of ``width / GROUP`` columns (column j is in group
``j % ngroups``), the k groups with the largest maxima are kept, and the top k
are selected among their members. Every true top-k column lies in one of
those groups (any column outside them is beaten by k group maxima), so the
result is exact while argpartition runs on ~1/GROUP of the scores.
"""

from __future__ import annotations

import numpy as np

GROUP = 16


def _select(scores: np.ndarray, cols: np.ndarray | None, k: int):
    """Top k (unsorted) along the last axis: (scores, column indices)."""
    width = scores.shape[-1]
    if width <= k:
        idx = np.broadcast_to(np.arange(width), scores.shape)
    else:
        idx = np.argpartition(scores, width - k, axis=-1)[..., width - k:]
    top = np.take_along_axis(scores, idx, axis=-1)
    if cols is not None:
        idx = np.take_along_axis(cols, idx, axis=-1)
    return top, idx


def _block_topk(scores: np.ndarray, k: int):
    """Top k of scores [G, T, W] along W: (scores, columns), both [G, T, min(k, W)]."""
    G, T, W = scores.shape
    if W < 4 * k * GROUP:
        return _select(scores, None, k)
    pad = (-W) % GROUP
    if pad:
        scores = np.concatenate([scores, np.full((G, T, pad), -np.inf, scores.dtype)], axis=-1)
    ngroups = scores.shape[-1] // GROUP
    maxima = scores.reshape(G, T, GROUP, ngroups).max(axis=2)
    _, groups = _select(maxima, None, k)                                  # [G,T,k]
    cols = (groups[..., None] + ngroups * np.arange(GROUP)).reshape(G, T, -1)
    return _select(np.take_along_axis(scores, cols, axis=-1), cols, k)


def blocked_topk(queries, keys, n_valid, k, weight=None, bias=None, block_bytes=64 << 20):
    """Exact top-k key indices for every query.

    queries  [G, T, D] float32
    keys     [G, N, D] float32, of which the first ``n_valid[g]`` rows count
    n_valid  [G] int
    weight, bias: optional per-key transform (scalar or [G, N]); the ranked
             score is ``(q . k) * weight - bias`` (see metrics.column_transform)
    returns  indices [G, T, min(k, max n_valid)] int64 into N, unsorted, -1
             where a query has fewer valid keys than k.
    """
    G, T, D = queries.shape
    n_max = int(np.max(n_valid, initial=0))
    kk = min(k, n_max)
    if kk == 0 or T == 0:
        return np.full((G, T, kk), -1, np.int64)
    col_block = max(GROUP * 4 * k, block_bytes // max(G * T * 4, 1))
    col_block = min(col_block, n_max)
    row_block = max(1, min(T, block_bytes // max(G * col_block * 4, 1)))
    out = np.empty((G, T, kk), np.int64)
    for t0 in range(0, T, row_block):
        q = queries[:, t0:t0 + row_block]
        best_s = best_i = None
        for c0 in range(0, n_max, col_block):
            c1 = min(c0 + col_block, n_max)
            s = np.matmul(q, keys[:, c0:c1].transpose(0, 2, 1))
            if weight is not None:
                s *= weight if np.isscalar(weight) or np.ndim(weight) == 0 else weight[:, None, c0:c1]
            if bias is not None:
                s -= bias[:, None, c0:c1]
            for g in np.flatnonzero(n_valid < c1):
                s[g, :, max(int(n_valid[g]) - c0, 0):] = -np.inf
            top_s, top_i = _block_topk(s, kk)
            top_i = top_i + c0
            if best_s is None:
                best_s, best_i = top_s, top_i
            else:
                best_s, best_i = _select(
                    np.concatenate([best_s, top_s], -1), np.concatenate([best_i, top_i], -1), kk
                )
        out[:, t0:t0 + row_block] = np.where(np.isneginf(best_s), -1, best_i)
    return out
