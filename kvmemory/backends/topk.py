"""Exact blocked top-k of dot-product scores in numpy.

For each index g and tile of ``tq`` queries, the scores of all its valid keys
are written, key-major, into one buffer ``S [n, tq]`` by 2-D BLAS matmuls of
``w`` keys at a time (``keys[g, a:a + w] @ q.T``: both operands contiguous, so
numpy hands them to sgemm as they are). Right after each matmul, while its
``[w, tq]`` slab is still in cache, the slab is reduced to the maxima of its
groups of ``group`` consecutive keys (``M [n / group, tq]``). Selection then
touches only M and a few candidates:

1. the ``k`` groups with the largest maxima, per query (argpartition of M);
2. the ``k * group`` scores of their members, gathered from S, and the top
   ``k`` among them (argpartition).

Every true top-k key lies in one of those groups (a key outside them is
beaten by k group maxima, each the score of a distinct key), so the result is
exact, while the full score matrix is passed over once, by the max, in cache;
the group size is about ``sqrt(n / k)``, balancing the two selections.

Indices with more valid keys than fit in ``block_bytes`` (with at least
``MIN_TILE_QUERIES`` queries) are split into column chunks whose top-k are
merged. Tiles of (index, queries) run on a thread pool when given one (numpy
releases the GIL in matmul, reductions, partitions and takes); each worker
owns one score buffer for all its tiles. Large searches hold BLAS to one
thread while they run (through threadpoolctl, if installed: extra ``fast``):
a multi-threaded BLAS woken for each small matmul thrashes, and more so on a
loaded machine. Without threadpoolctl a search runs on the calling thread.

Measured against the previous kernel (one 64 MiB score block per pair of
indices, selection over the block out of cache), 32 indices x 512 queries x
16,384 keys, one thread: 0.55-0.72 s vs 0.96-1.08 s; the matmul alone
(~110 GFLOP/s here) is 0.31 s of it.
"""

from __future__ import annotations

import math

import numpy as np

SLAB_BYTES = 1 << 20      # scores per matmul slab: stays in L2 for the max that follows
MAX_TILE_QUERIES = 256    # queries per tile (measured: 256 beats 128 and 512 by 5-25% at 16,384 keys)
MIN_TILE_QUERIES = 64     # fewer queries per tile than this: split the keys into column chunks instead
M_PAD = 16                # floats of padding per row of group maxima
GROUP_FACTOR = 1.0        # group ~ GROUP_FACTOR * sqrt(n / k), rounded to a power of two
PARALLEL_MIN_SCORES = 1 << 22   # a search computing fewer scores than this runs on one thread
LIMIT_MIN_SCORES = 1 << 20      # ... and one this small leaves the BLAS thread count alone


def _group_size(n: int, k: int) -> int:
    """Keys per group for n keys and top k: a power of two near sqrt(n / k), at least 4; 1 if too few keys."""
    group = 1 << max(2, round(math.log2(GROUP_FACTOR * math.sqrt(n / k))))
    return group if n >= 4 * k * group else 1


def _chunk_topk(keys, qT, k, weight, bias, buf, mbuf):
    """Top k of the scores keys [n, D] @ qT [D, tq] along n: (ranked [tq, k], positions [tq, k]), unsorted.

    weight, bias: None, a scalar, or [n] (ranked = score * weight - bias).
    buf, mbuf: float32 scratch of at least (n + group) * tq and (n / 4 + 1) * (tq + M_PAD) elements.
    """
    n = keys.shape[0]
    tq = qT.shape[1]
    group = _group_size(n, k)
    ngr = -(-n // group)
    rows = ngr * group
    S = buf[:rows * tq].reshape(rows, tq)
    slab = max(group, (SLAB_BYTES // (4 * tq)) // group * group)
    # maxima rows padded past a power of two: transposing a [2^a, 2^b] array thrashes the cache
    M = mbuf[:ngr * (tq + M_PAD)].reshape(ngr, tq + M_PAD)[:, :tq] if group > 1 else None
    for a in range(0, n, slab):
        e = min(a + slab, n)
        s = S[a:e]
        np.matmul(keys[a:e], qT, out=s)
        if weight is not None:
            s *= weight if np.ndim(weight) == 0 else weight[a:e, None]
        if bias is not None:
            s -= bias[a:e, None]
        if group > 1:
            if e == n and rows > n:
                S[n:rows] = -np.inf
                e = rows
            np.maximum.reduce(S[a:e].reshape(-1, group, tq), axis=1, out=M[a // group:e // group])
    if group == 1:                                    # few keys: select among all of them
        S = np.ascontiguousarray(S.T)                 # [tq, n]
        if n <= k:
            return S, np.broadcast_to(np.arange(n), (tq, n))
        pos = np.argpartition(S, n - k, axis=1)[:, n - k:]
        return np.take_along_axis(S, pos, 1), pos
    top = np.argpartition(np.ascontiguousarray(M.T), ngr - k, axis=1)[:, ngr - k:]   # [tq, k] group ids
    # the members of group j for query t sit at S[j * group + i, t], i < group
    first = top * (group * tq) + np.arange(tq)[:, None]
    cs = np.take(S.reshape(-1), (first[:, :, None] + np.arange(0, group * tq, tq)).reshape(tq, k * group))
    pick = np.argpartition(cs, k * group - k, axis=1)[:, k * group - k:]   # [tq, k] into the candidates
    pos = np.take_along_axis(top, pick // group, 1) * group + pick % group
    return np.take_along_axis(cs, pick, 1), pos


def _merge(best, new, k):
    """Top k of two (ranked [tq, m], positions [tq, m]) candidate sets, along axis 1."""
    if best is None:
        return new
    s, p = np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1)
    if s.shape[1] <= k:
        return s, p
    pick = np.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k:]
    return np.take_along_axis(s, pick, 1), np.take_along_axis(p, pick, 1)


def blocked_topk(queries, keys, n_valid, k, weight=None, bias=None, block_bytes=64 << 20, mapper=None, threads=1):
    """Exact top-k key indices for every query, and their ranked scores.

    queries  [G, T, D] float32
    keys     [G, N, D] float32, of which the first ``n_valid[g]`` rows count
    n_valid  [G] int
    weight, bias: optional per-key transform (scalar or [G, N]); the ranked
             score is ``(q . k) * weight - bias`` (see metrics.column_transform)
    block_bytes: most bytes of float32 scores per thread at once
    mapper, threads: ``mapper(fn, items)`` runs tiles on ``threads`` threads (e.g. HostBackend.map);
             used only for searches of at least PARALLEL_MIN_SCORES scores
    returns  (indices, ranked): indices [G, T, min(k, max n_valid)] int64 into N,
             unsorted, -1 where a query has fewer valid keys than k; ranked [G, T, ...]
             float32, the ranked score of each (-inf at -1), which
             ``metrics.scores_from_ranked`` turns into the metric's score.
    """
    G, T, _ = queries.shape
    n_valid = np.asarray(n_valid)
    n_max = int(np.max(n_valid, initial=0))
    kk = min(k, n_max)
    out = np.full((G, T, kk), -1, np.int64)
    out_scores = np.full((G, T, kk), -np.inf, np.float32)
    if kk == 0 or T == 0:
        return out, out_scores
    budget = max(block_bytes // 4, MIN_TILE_QUERIES)        # float32 scores per buffer
    tq = max(1, min(T, MAX_TILE_QUERIES, max(MIN_TILE_QUERIES, budget // max(n_max, 1))))
    chunk = max(kk, budget // tq)                               # columns per chunk
    widest = min(chunk, n_max)
    buf_len = (widest + _group_size(widest, kk)) * tq           # scores, padded to whole groups

    tiles = [(g, t0) for g in range(G) if n_valid[g] > 0 for t0 in range(0, T, tq)]
    w_all = weight if weight is not None and np.ndim(weight) else None

    def run(part):
        buf = np.empty(buf_len, np.float32)
        mbuf = np.empty((buf_len // tq // 4 + 1) * (tq + M_PAD), np.float32)   # group maxima: groups >= 4 keys
        for g, t0 in part:
            n = int(n_valid[g])
            qT = queries[g, t0:t0 + tq].T
            best = None
            for c0 in range(0, n, chunk):
                c1 = min(c0 + chunk, n)
                s, p = _chunk_topk(keys[g, c0:c1], qT, min(kk, c1 - c0),
                                   w_all[g, c0:c1] if w_all is not None else weight,
                                   bias[g, c0:c1] if bias is not None else None, buf, mbuf)
                best = _merge(best, (s.copy(), p + c0), kk)
            s, p = best
            m = s.shape[1]
            out[g, t0:t0 + tq, :m] = np.where(np.isneginf(s), -1, p)
            out_scores[g, t0:t0 + tq, :m] = s

    parallel = (mapper is not None and threads > 1 and len(tiles) > 1 and G * T * n_max >= PARALLEL_MIN_SCORES
                and _blas_limiter() is not None)
    limiter = _blas_limiter() if G * T * n_max >= LIMIT_MIN_SCORES else None
    if limiter is None:
        run(tiles)
        return out, out_scores
    # one BLAS thread per worker: a multi-threaded BLAS woken for each small matmul thrashes
    # (measured with OpenBLAS on 2 loaded cores: 9x slower on one worker, 17x on two)
    with limiter.limit(limits=1, user_api="blas"):
        if parallel:
            mapper(run, [tiles[i::threads] for i in range(min(threads, len(tiles)))])
        else:
            run(tiles)
    return out, out_scores


_LIMITER = []


def _blas_limiter():
    """A threadpoolctl.ThreadpoolController, or None without threadpoolctl (then tiles run on one
    Python thread and BLAS threads the matmuls itself)."""
    if not _LIMITER:
        try:
            from threadpoolctl import ThreadpoolController
            _LIMITER.append(ThreadpoolController())
        except Exception:      # not installed, or it cannot inspect this process's libraries
            _LIMITER.append(None)
    return _LIMITER[0]
