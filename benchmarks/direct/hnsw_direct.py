"""hnswlib called directly (no kvmemory): the baseline for kvmemory's hnsw wrapper overhead."""

from __future__ import annotations

import os
import time

import hnswlib
import numpy as np

#: as ``kvmemory.backends.hnsw.HnswSegmentIndex.centre_sample``: keys whose mean centres an "ip" graph
CENTRE_SAMPLE = 512


def build(keys: np.ndarray, k: int, metric: str, params: dict):
    """One monolithic hnswlib index over keys [n, d] float32; returns (search, build seconds).

    metric: "ip" | "cosine" | "l2" (cosine: both sides normalized, space "ip", as the backend does).
    For "ip" and "cosine" the graph holds centred keys ``k - c``, c the mean of the first
    min(n, CENTRE_SAMPLE) keys, as the backend does per segment: q.(k - c) ranks as q.k
    (a constant per query), so queries are used as they are, and the graph navigates far
    better on keys that share a common direction.
    params: M, ef_construction, ef as resolved by ``backend="hnsw"`` (e.g. ``Memory.options``;
    other keys ignored); missing ones get the backend's defaults for a segment of n entries.
    Items are added with one thread, as the backend does; the search is one ``knn_query``
    on all cores: ``search(queries [t, d] float32) -> ids [t, k] int64`` best first, -1 padded.
    """
    keys = np.ascontiguousarray(keys, np.float32)
    n, d = keys.shape
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-30)
    if metric != "l2" and n:
        keys = np.ascontiguousarray(keys - keys[:CENTRE_SAMPLE].mean(0, dtype=np.float64), np.float32)
    M = params.get("M") or (16 if d <= 256 else 32)
    ef_construction = params.get("ef_construction") or max(64, 4 * M)
    ef = params.get("ef") or (64 if n <= 32768 else 128)

    t0 = time.perf_counter()
    index = hnswlib.Index(space="l2" if metric == "l2" else "ip", dim=d)
    index.init_index(max_elements=n, M=M, ef_construction=ef_construction)
    index.add_items(keys, np.arange(n), num_threads=1)
    build_s = time.perf_counter() - t0
    index.set_ef(ef)
    kk = min(k, n)

    def search(queries):
        queries = np.ascontiguousarray(queries, np.float32)
        if metric == "cosine":
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
        labels, _ = index.knn_query(queries, k=kk, num_threads=os.cpu_count() or 1)
        ids = np.full((len(queries), k), -1, np.int64)
        ids[:, :kk] = labels
        return ids

    return search, build_s
