"""Pure, jitted ring-buffer kernels behind backend="jax": add, clear and exact top-k search.

A :class:`RingState` holds every (row, head) of a memory (B rows, H heads, C capacity):

    keys      [B, H, C, Dk] float32
    values    [B, H, C, Dv] float32
    sqnorms   [B, H, C] float32, squared key norms (metrics cosine and l2; else None)
    scan_keys [B, H, C, Dk] bfloat16, what a low-precision scan multiplies (else None)
    counts    [B] int64, entries added per row since its last clear

Stream id ``i`` of row b lives in slot ``i % C``; ids restart at 0 after a
clear, so a row's live slots are the prefix ``[0, min(counts[b], C))``.

The functions are pure (state in, state out) and shape-static, so they can
also run inside a caller's own ``jax.jit``. They need 64-bit integers
(``jax.enable_x64``) for int64 counts and ids; ``JaxBackend`` enters it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kvmemory.result import SearchResult


# a pytree, so that jitted functions can return and take search results
jax.tree_util.register_dataclass(SearchResult, data_fields=[f.name for f in dataclasses.fields(SearchResult)],
                                 meta_fields=[])


class RingState(NamedTuple):
    keys: jax.Array
    values: jax.Array
    sqnorms: jax.Array | None
    scan_keys: jax.Array | None
    counts: jax.Array


@functools.partial(jax.jit, donate_argnums=0)
def add(state: RingState, keys: jax.Array, values: jax.Array) -> RingState:
    """Append keys [B,T,H,Dk] and values [B,T,H,Dv] float32; of T > C only the last C are written."""
    B, T = keys.shape[:2]
    C = state.keys.shape[2]
    skip = max(T - C, 0)
    keys, values = keys[:, skip:], values[:, skip:]
    slots = (state.counts[:, None] + skip + jnp.arange(T - skip)) % C      # [B, n], unique per row
    rows = jnp.arange(B)[:, None]

    def put(store, new):  # store [B,H,C,...] at (rows, :, slots) is [B,n,H,...], the layout of new
        return store.at[rows, :, slots].set(new.astype(store.dtype), unique_indices=True)

    return RingState(
        keys=put(state.keys, keys),
        values=put(state.values, values),
        sqnorms=None if state.sqnorms is None else put(state.sqnorms, jnp.sum(keys * keys, -1)),
        scan_keys=None if state.scan_keys is None else put(state.scan_keys, keys),
        counts=state.counts + T,
    )


@functools.partial(jax.jit, donate_argnums=0)
def clear(counts: jax.Array, mask: jax.Array) -> jax.Array:
    """counts [B] with the rows of ``mask`` [B] bool reset to 0 (their slots become unreachable)."""
    return jnp.where(mask, 0, counts)


def plan_blocks(G: int, T: int, C: int, m: int, block_bytes: int) -> tuple[int, int]:
    """(columns, query tokens) per scan tile so that its float32 scores [G = B*H, tokens, columns] fit block_bytes.

    Columns never drop below m (each tile keeps its top m); tokens drop to 1 at worst.
    """
    cols = min(C, max(m, block_bytes // max(G * T * 4, 1)))
    rows = max(1, min(T, block_bytes // max(G * cols * 4, 1)))
    return cols, rows


def _scan(q, keys, sqnorms, n_valid, m: int, cols: int, metric: str):
    """Ranked scores and slots [B,H,t,m] of the m best live keys for q [B,H,t,D], tile by tile.

    keys [B,H,C,D], sqnorms [B,H,C] or None, n_valid [B]. The ranked score
    is the metric up to a per-query monotone map: q.k (ip), q.k/|k| (cosine),
    2 q.k - |k|^2 (l2). Columns are scanned ``cols`` at a time, only as far as
    the fullest row reaches, merging each tile's top m. Empty results: slot C, score -inf.
    """
    B, H, t, _ = q.shape
    C = keys.shape[2]
    n_valid = n_valid[:, None, None, None]

    def tile(c0):
        start = jnp.minimum(c0, C - cols)  # the last tile is shifted left to fit; its overlap is masked
        s = jnp.einsum("bhtd,bhcd->bhtc", q, lax.dynamic_slice_in_dim(keys, start, cols, 2),
                       preferred_element_type=jnp.float32)
        col = start + jnp.arange(cols, dtype=jnp.int32)
        if metric != "ip":
            sq = lax.dynamic_slice_in_dim(sqnorms, start, cols, 2)[:, :, None]       # [B,H,1,cols]
            s = (s * jnp.where(sq > 0, lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0) if metric == "cosine"
                 else 2 * s - sq)
        s, idx = lax.top_k(jnp.where((col >= c0) & (col < n_valid), s, -jnp.inf), min(m, cols))
        slot = col[idx]
        return s, jnp.where((slot >= c0) & (slot < n_valid), slot, C)

    if cols >= C:
        return tile(0)

    def merge(i, best):
        s, slots = tile(i * cols)
        s, pick = lax.top_k(jnp.concatenate([best[0], s], -1), m)
        return s, jnp.take_along_axis(jnp.concatenate([best[1], slots], -1), pick, -1)

    n_tiles = (jnp.max(n_valid) + cols - 1) // cols
    init = (jnp.full((B, H, t, m), -jnp.inf, jnp.float32), jnp.full((B, H, t, m), C, jnp.int32))
    return lax.fori_loop(0, n_tiles, merge, init)


@functools.partial(jax.jit, static_argnames=("k", "m", "cols", "rows", "metric", "with_entries"))
def search(state: RingState, queries: jax.Array, *, k: int, m: int, cols: int, rows: int,
           metric: str, with_entries: bool = True) -> SearchResult:
    """Exact top-k of queries [B,T,H,Dk] float32 over each (row, head)'s live entries, best first.

    The scan keeps m candidates per query, tiled as ``plan_blocks`` says
    (``rows`` query tokens and ``cols`` slots at a time). m = min(k, C) with
    float32 keys: scores follow from the ranked ones. m > k with bfloat16
    scan keys: the m candidates are re-scored exactly in float32 and the
    best k kept. Scores are those of ``kvmemory.metrics``. Slots past what a
    row holds: ids -1, zeros, mask False. ``with_entries=False``: keys and values None.
    """
    B, T, H, D = queries.shape
    C = state.keys.shape[2]
    n_valid = jnp.minimum(state.counts, C)                                          # [B]
    scan_keys = state.keys if state.scan_keys is None else state.scan_keys
    q = queries.astype(scan_keys.dtype).swapaxes(1, 2)                              # [B,H,T,D]
    n_chunks = math.ceil(T / rows)
    if n_chunks == 1:
        ranked, slots = _scan(q, scan_keys, state.sqnorms, n_valid, m, cols, metric)
    else:  # query tokens in chunks, padded to a whole number of them
        qc = jnp.pad(q, ((0, 0), (0, 0), (0, n_chunks * rows - T), (0, 0)))
        qc = jnp.moveaxis(qc.reshape(B, H, n_chunks, rows, D), 2, 0)
        ranked, slots = lax.map(lambda x: _scan(x, scan_keys, state.sqnorms, n_valid, m, cols, metric), qc)
        ranked, slots = (jnp.moveaxis(a, 0, 2).reshape(B, H, n_chunks * rows, m)[:, :, :T] for a in (ranked, slots))
    ranked, slots = ranked.swapaxes(1, 2), slots.swapaxes(1, 2)                     # [B,T,H,m]

    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, None, :, None]

    def take(store, at):  # store [B,H,C,...] at slots [B,T,H,m] -> [B,T,H,m,...]; slot C gives zeros
        return store.at[b, h, at].get(mode="fill", fill_value=0)

    keys = None
    if state.scan_keys is None:
        scores = _from_ranked(ranked, queries, metric)
    else:
        keys = take(state.keys, slots)
        scores = _exact_scores(queries, keys, None if state.sqnorms is None else take(state.sqnorms, slots), metric)
        scores, order = lax.top_k(jnp.where(slots < C, scores, -jnp.inf), min(k, m))
        slots = jnp.take_along_axis(slots, order, -1)
        keys = jnp.take_along_axis(keys, order[..., None], -2)
    mask = slots < C
    scores = jnp.where(mask, scores, 0.0)
    lo = jnp.maximum(state.counts - C, 0)[:, None, None, None]
    ids = jnp.where(mask, lo + (slots - lo) % C, -1)
    values = None
    if with_entries:
        keys = take(state.keys, slots) if keys is None else keys
        values = take(state.values, slots)
    else:
        keys = None
    res = SearchResult(keys=keys, values=values, scores=scores, ids=ids, mask=mask)
    pad = k - mask.shape[-1]  # k > capacity: empty slots at the end
    if pad:
        res = SearchResult(*(None if x is None else jnp.pad(x, [(0, 0)] * 3 + [(0, pad)] + [(0, 0)] * (x.ndim - 4),
                                                           constant_values=fill)
                             for x, fill in zip(res, (0, 0, 0, -1, False))))
    return res


def _from_ranked(ranked, queries, metric: str):
    """Metric scores [B,T,H,m] from the ranked scores of ``_scan`` for queries [B,T,H,D]."""
    if metric == "ip":
        return ranked
    q_sq = jnp.sum(queries * queries, -1, keepdims=True)
    if metric == "l2":
        return jnp.minimum(ranked - q_sq, 0)
    q_norm = jnp.sqrt(q_sq)
    return jnp.where(q_norm > 0, ranked / jnp.where(q_norm > 0, q_norm, 1.0), 0.0)


def _exact_scores(q, keys, sqnorms, metric: str):
    """float32 scores of q [B,T,H,D] against its candidates keys [B,T,H,m,D] (sqnorms [B,T,H,m]) -> [B,T,H,m]."""
    dots = jnp.einsum("bthd,bthmd->bthm", q, keys)
    if metric == "ip":
        return dots
    q_sq = jnp.sum(q * q, -1, keepdims=True)
    if metric == "l2":
        return -jnp.maximum(q_sq - 2 * dots + sqnorms, 0)
    denom = jnp.sqrt(q_sq * sqnorms)
    return jnp.where(denom > 0, dots / jnp.where(denom > 0, denom, 1.0), 0.0)
