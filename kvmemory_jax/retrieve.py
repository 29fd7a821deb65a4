"""Top-k search of a :class:`~kvmemory_jax.state.MemoryState`, pure and jittable.

Scores are those of ``kvmemory.metrics`` (higher is closer): ``ip`` q.k,
``cosine`` q.k/(|q||k|), ``l2`` -|q-k|^2. Only a row's live slots (the
prefix ``[0, size)`` of its ring) are ever candidates: no evicted or
cleared entry is returned, whatever the method.

The scan multiplies each query chunk by the keys tile by tile (``block_bytes``
bounds a tile's float32 scores) and merges each tile's top m. With
bfloat16 scan keys it keeps m = ``rescore_factor`` * k candidates and
re-scores them exactly in float32. Approximate methods (``topk.METHODS``)
select over whole rows of C slots: their tiles are query chunks only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from kvmemory.result import SearchResult
from kvmemory.validation import check_float_array

from . import checks, topk
from .state import MemoryState, size, stream_ids

DEFAULT_BLOCK_BYTES = 256 << 20

# a pytree, so that jitted functions can take and return search results
try:
    jax.tree_util.register_dataclass(SearchResult, data_fields=["keys", "values", "scores", "ids", "mask"],
                                     meta_fields=[])
except ValueError:  # registered already (a module reload)
    pass


def search(state: MemoryState, queries: jax.Array, k: int, *, method: str = "exact", recall_target: float = 0.95,
           rescore_factor: int = 2, block_bytes: int = DEFAULT_BLOCK_BYTES, with_entries: bool = True,
           check_finite: bool = False) -> SearchResult:
    """The top-k live entries of each query's (row, head), best first.

    Args:
        queries: [B, T, H, Dk], any float dtype (searched in float32).
        k: neighbours per query (a static int >= 1; k > C pads with empty slots).
        method: "exact", "approx_max_k" or "bins" (see :mod:`kvmemory_jax.topk`).
        recall_target: expected recall@k of the approximate methods.
        rescore_factor: bfloat16 scans keep rescore_factor * k candidates.
        block_bytes: most bytes of float32 scores per scan tile.
        with_entries: False skips gathering keys and values (None in the result).
        check_finite: add a ``checkify`` check of the queries (see :mod:`kvmemory_jax.checks`).

    Returns a ``SearchResult`` of keys [B,T,H,k,Dk], values [B,T,H,k,Dv],
    scores [B,T,H,k] float32, ids [B,T,H,k] int32 (stream position modulo
    2**31, -1 in empty slots) and mask [B,T,H,k] bool (False: empty slot,
    zeros elsewhere). The result is a constant under ``jax.grad``: no gradient
    reaches the queries through it, nor the memory.
    """
    k = checks.static_int("k", k)
    queries = check_float_array(queries, "queries", (("batch", state.batch_size), ("tokens", None),
                                                     ("heads", state.num_heads), ("key_dim", state.key_dim)),
                                checks.FLOAT_DTYPES)
    check_options(method=method, recall_target=recall_target, rescore_factor=rescore_factor,
                  block_bytes=block_bytes, with_entries=with_entries)
    if check_finite:
        checks.finite(queries=queries)
    B, T, H, _ = queries.shape
    C = state.capacity
    m = min(k * rescore_factor if state.scan_keys is not None else k, C)
    cols, rows = plan_blocks(B * H, T, C, m, block_bytes, whole_rows=method != "exact")
    return _search(state, queries, k=k, m=m, cols=cols, rows=rows, method=method,
                   recall_target=float(recall_target), with_entries=with_entries)


def check_options(method: str = "exact", recall_target: float = 0.95, rescore_factor: int = 2,
                  block_bytes: int = DEFAULT_BLOCK_BYTES, with_entries: bool = True) -> None:
    """Raise ValueError/TypeError naming the first bad search option."""
    if method not in topk.METHODS:
        raise ValueError(f"method must be one of {topk.METHODS}, got {method!r}")
    if isinstance(recall_target, bool) or not isinstance(recall_target, (int, float)) or not 0 < recall_target <= 1:
        raise ValueError(f"recall_target must be a float in (0, 1], got {recall_target!r}")
    checks.static_int("rescore_factor", rescore_factor)
    checks.static_int("block_bytes", block_bytes)
    if not isinstance(with_entries, bool):
        raise TypeError(f"with_entries must be a bool, got {type(with_entries).__name__} {with_entries!r}")


def plan_blocks(G: int, T: int, C: int, m: int, block_bytes: int, whole_rows: bool = False) -> tuple[int, int]:
    """(columns, query tokens) per scan tile so that its float32 scores [G = B*H, tokens, columns] fit block_bytes.

    Columns never drop below m (each tile keeps its top m), nor below C with
    ``whole_rows``; tokens drop to 1 at worst.
    """
    cols = C if whole_rows else min(C, max(m, block_bytes // max(G * T * 4, 1)))
    rows = max(1, min(T, block_bytes // max(G * cols * 4, 1)))
    return cols, rows


def _per_row(fn):
    """fn over [H, ...] slices, mapped over the batch axis (a batching dim of the gathers: shards cleanly)."""
    return jax.vmap(fn)


def _scan(q, keys, sqnorms, n_valid, m: int, cols: int, metric: str, method: str, recall_target: float):
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
        live = (col >= c0) & (col < n_valid) & ~jnp.isnan(s)   # a NaN score (unchecked key) is no neighbour
        s, idx = topk.select(jnp.where(live, s, -jnp.inf), min(m, cols), method, recall_target)
        slot = start + idx
        return s, jnp.where((slot >= c0) & (slot < n_valid) & (s > -jnp.inf), slot, C)

    if cols >= C:
        return tile(0)

    def merge(i, best):
        s, slots = tile(i * cols)
        s, pick = lax.top_k(jnp.concatenate([best[0], s], -1), m)
        return s, jnp.take_along_axis(jnp.concatenate([best[1], slots], -1), pick, -1)

    n_tiles = (jnp.max(n_valid) + cols - 1) // cols
    init = (jnp.full((B, H, t, m), -jnp.inf, jnp.float32), jnp.full((B, H, t, m), C, jnp.int32))
    return lax.fori_loop(0, n_tiles, merge, init)


@functools.partial(jax.jit, static_argnames=("k", "m", "cols", "rows", "method", "recall_target", "with_entries"))
def _search(state: MemoryState, queries: jax.Array, *, k: int, m: int, cols: int, rows: int, method: str,
            recall_target: float, with_entries: bool) -> SearchResult:
    state, queries = lax.stop_gradient((state, queries.astype(jnp.float32)))
    metric = state.metric
    B, T, H, D = queries.shape
    C = state.capacity
    if T == 0:
        return _empty(state, B, T, H, k, with_entries)
    n_valid = size(state)                                                           # [B]
    scan_keys = state.keys if state.scan_keys is None else state.scan_keys
    q = queries.astype(scan_keys.dtype).swapaxes(1, 2)                              # [B,H,T,D]
    scan = functools.partial(_scan, keys=scan_keys, sqnorms=state.sqnorms, n_valid=n_valid, m=m, cols=cols,
                             metric=metric, method=method, recall_target=recall_target)
    n_chunks = math.ceil(T / rows)
    if n_chunks == 1:
        ranked, slots = scan(q)
    else:  # query tokens in chunks, padded to a whole number of them
        qc = jnp.pad(q, ((0, 0), (0, 0), (0, n_chunks * rows - T), (0, 0)))
        qc = jnp.moveaxis(qc.reshape(B, H, n_chunks, rows, D), 2, 0)
        ranked, slots = lax.map(scan, qc)
        ranked, slots = (jnp.moveaxis(a, 0, 2).reshape(B, H, n_chunks * rows, m)[:, :, :T] for a in (ranked, slots))
    ranked, slots = ranked.swapaxes(1, 2), slots.swapaxes(1, 2)                     # [B,T,H,m]

    # store [B,H,C,...] at slots [B,T,H,m] -> [B,T,H,m,...]; slot C gives zeros
    take = _per_row(lambda store, at: jax.vmap(lambda s, a: s.at[a].get(mode="fill", fill_value=0),
                                               in_axes=(0, 1), out_axes=1)(store, at))

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
    ids = jnp.where(mask, stream_ids(state, jnp.where(mask, slots, 0)), -1)
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


def _empty(state: MemoryState, B: int, T: int, H: int, k: int, with_entries: bool) -> SearchResult:
    return SearchResult(keys=jnp.zeros((B, T, H, k, state.key_dim), jnp.float32) if with_entries else None,
                        values=jnp.zeros((B, T, H, k, state.value_dim), jnp.float32) if with_entries else None,
                        scores=jnp.zeros((B, T, H, k), jnp.float32), ids=jnp.full((B, T, H, k), -1, jnp.int32),
                        mask=jnp.zeros((B, T, H, k), jnp.bool_))


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
