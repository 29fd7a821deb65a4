"""Scores of the three metrics, in numpy. Higher is always closer.

ip      q . k
cosine  q . k / (|q| |k|), 0 where either norm is 0
l2      -|q - k|^2
"""

from __future__ import annotations

import numpy as np


def score_candidates(metric: str, queries: np.ndarray, keys: np.ndarray, sqnorms=None) -> np.ndarray:
    """Exact scores of queries [..., D] against their candidates keys [..., m, D] -> [..., m]."""
    dots = np.matmul(keys, queries[..., None])[..., 0]
    if metric == "ip":
        return dots
    if sqnorms is None:
        sqnorms = np.einsum("...md,...md->...m", keys, keys)
    q_sq = np.einsum("...d,...d->...", queries, queries)[..., None]
    if metric == "l2":
        return -np.maximum(q_sq - 2 * dots + sqnorms, 0)
    denom = np.sqrt(q_sq * sqnorms)
    return np.divide(dots, denom, out=np.zeros_like(dots), where=denom > 0)


def unit(x: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Rows of x [..., D] scaled to unit length (zero rows stay zero); ``norms`` [..., 1] if already known."""
    if norms is None:
        norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def column_transform(metric: str, sqnorms):
    """(weight, bias) per key so that ``score * weight - bias`` ranks keys as the metric does.

    For a fixed query: cosine ranks by q.k / |k|, l2 by 2 q.k - |k|^2.
    Returns (None, None) for ip. sqnorms: [..., N].
    """
    if metric == "ip":
        return None, None
    if metric == "cosine":
        norms = np.sqrt(sqnorms)
        return np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0), None
    return np.float32(2.0), sqnorms


def scores_from_ranked(metric: str, ranked: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Metric scores [..., m] from the ranked scores of ``column_transform`` for queries [..., D].

    cosine: ranked / |q| (0 for a zero query); l2: ranked - |q|^2, at most 0; ip: ranked itself.
    """
    if metric == "ip":
        return ranked
    q_sq = np.einsum("...d,...d->...", queries, queries)[..., None]
    if metric == "l2":
        return np.minimum(ranked - q_sq, 0)
    q_norm = np.sqrt(q_sq)
    return np.divide(ranked, q_norm, out=np.zeros_like(ranked), where=q_norm > 0)
