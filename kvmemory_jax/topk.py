"""Top-m selection along the last axis: exact, ``lax.approx_max_k``, or portable bins.

``method``:

* ``"exact"`` - exact, in two stages when the row is long (``grouped_top_k``):
  the top m of the column groups' maxima, then the top m of those groups'
  members; ``lax.top_k`` over a whole row of 65,536 scores costs several
  times the matmul that made them on CPU.
* ``"approx_max_k"`` - ``lax.approx_max_k(recall_target=...)``: the TPU's
  fast approximate top-k. XLA implements it as an approximation on TPU
  only; on CPU and GPU it falls back to the exact top-k (same results, no
  speed-up).
* ``"bins"`` - the same idea in plain XLA ops, approximate on every
  backend: the n columns are dealt into M bins (column c into bin c % M),
  each bin keeps its best column, and the best m of the M bin maxima are
  returned. A true top-m column is lost only when a better one shares its
  bin; M is the smallest number of bins whose expected recall
  ((M - 1) / M) ** (m - 1) reaches ``recall_target`` (the sizing rule of
  XLA's approximate top-k), rounded up to a power of two (aligned tiles;
  recall only rises). Striding keeps a partly filled ring's live prefix
  spread over all bins. Only the m picked bins look for their best column
  (an argmax over m, not M, bins).

Every method returns (values, indices), best first; approximate methods
may put a worse column in place of a better one (a recall loss), never an
index outside [0, n).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

METHODS = ("exact", "approx_max_k", "bins")


def num_bins(n: int, m: int, recall_target: float) -> int:
    """Bins (a power of two, or n itself: exact) for an expected recall@m of ``recall_target`` over n columns."""
    if recall_target >= 1 or m <= 1:
        return n if m > 1 else 1
    bins = max(math.ceil(1 / (1 - recall_target ** (1 / (m - 1)))), m)
    return min(n, 1 << (bins - 1).bit_length())


def select(x: jax.Array, m: int, method: str = "exact", recall_target: float = 0.95):
    """(values, indices) [..., m] of the m largest of x [..., n] along the last axis (m <= n)."""
    if method == "exact":
        return grouped_top_k(x, m)
    if method == "approx_max_k":
        return lax.approx_max_k(x, m, recall_target=recall_target)
    if method == "bins":
        return binned_top_k(x, m, recall_target)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def exact_groups(n: int, m: int) -> int:
    """Groups for ``grouped_top_k`` over n columns: a power of two near sqrt(n m), at least m; 0: too few columns.

    Below 128 m columns one ``lax.top_k`` is as fast (measured on CPU: break-even near n = 4,096 at m = 32).
    """
    if n < 128 * m:
        return 0
    return max(1 << round(math.log2(math.sqrt(n * m))), 1 << (m - 1).bit_length())


def grouped_top_k(x: jax.Array, m: int):
    """Exact top-m of x [..., n] along the last axis, by way of the maxima of strided column groups.

    Column c belongs to group c % G. Every true top-m column lies in one of the m groups with the
    largest maxima (a column outside them is beaten by those m maxima, m distinct columns), so the
    top m of those groups' members is the exact top m: two ``lax.top_k`` over G and n m / G values
    instead of one over n. For x without NaN the values equal ``lax.top_k``'s (among equal values the
    indices may differ); a NaN can hide its group (``jnp.max`` passes it on in operand order, and
    ranking groups in ``lax.top_k``'s total order instead cost 7x the reduction on CPU), so the
    search masks NaN scores as dead before selecting.
    """
    groups = exact_groups(x.shape[-1], m)
    if not groups:
        return lax.top_k(x, m)
    _, picked, members = _best_groups(x, groups, m)
    values, at = lax.top_k(members.reshape(*members.shape[:-2], -1), m)      # member r of group j at r * m + j
    group = jnp.take_along_axis(picked, at % m, -1)
    return values, ((at // m) * groups + group).astype(jnp.int32)


def _best_groups(x: jax.Array, groups: int, m: int):
    """x [..., n] dealt into strided groups (column r * groups + g -> group g, row r; -inf pads the last row):
    the m groups with the largest maxima as (maxima [..., m], group ids [..., m], members [..., rows, m])."""
    n = x.shape[-1]
    rows = -(-n // groups)
    if rows * groups > n:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, rows * groups - n)], constant_values=-jnp.inf)
    x = x.reshape(*x.shape[:-1], rows, groups)
    maxima, picked = lax.top_k(jnp.max(x, -2), m)
    members = jnp.take_along_axis(x, jnp.broadcast_to(picked[..., None, :], (*x.shape[:-2], rows, m)), -1)
    return maxima, picked, members


def binned_top_k(x: jax.Array, m: int, recall_target: float):
    """Approximate top-m of x [..., n]: the best of each of ``num_bins`` strided bins, then their exact top-m."""
    n = x.shape[-1]
    bins = num_bins(n, m, recall_target)
    if bins >= n:
        return lax.top_k(x, m)
    values, picked, columns = _best_groups(x, bins, m)          # the m best bins, by their maxima
    return values, (jnp.argmax(columns, -2) * bins + picked).astype(jnp.int32)
