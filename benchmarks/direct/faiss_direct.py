"""faiss called directly (no kvmemory): one monolithic index, one search call.

The benchmark harness compares this with ``Memory(backend="faiss")`` to
measure the wrapper's overhead. Parameters mirror the backend's options and
defaults (see ``kvmemory.backends.faiss.FaissBackend``), applied to one index
over all ``n`` keys instead of per segment.
"""

from __future__ import annotations

import math
import os
import time

import faiss
import numpy as np


def build(keys, k, metric, params):
    """Build one faiss index over keys [n, d] float32; returns (search, build_seconds).

    metric: "ip", "cosine" (ip over unit vectors) or "l2".
    params: backend options used here: index ("flat" | "ivf" | "hnsw" | factory
        string, default "ivf"), nlist, nprobe, M, ef_construction, ef_search,
        num_threads (OpenMP threads of the search; default all cores), e.g.
        ``Memory.options``; other keys are ignored, missing ones get the
        backend's defaults for a segment of n keys. The index is built with
        one thread, as the backend does.
    ``search(queries [t, d] float32) -> ids [t, k] int64`` (-1 pads) is one faiss search call.
    """
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-30)
    n, d = keys.shape
    kind = params.get("index") or "ivf"
    nlist = params.get("nlist") or max(1, min(round(4 * math.sqrt(n)), n // 39))
    nprobe = params.get("nprobe") or min(nlist, max(16, round(3 * math.sqrt(nlist))))
    M = params.get("M") or 32
    spec = {"flat": "Flat", "ivf": f"IVF{nlist},Flat", "hnsw": f"HNSW{M},Flat"}.get(kind, kind)
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        t0 = time.perf_counter()
        index = faiss.index_factory(d, spec, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
        if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            faiss.downcast_index(index).hnsw.efConstruction = params.get("ef_construction") or 40
        if not index.is_trained:
            index.train(keys)
        index.add(keys)
        space = faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", params.get("ef_search") or 64)):
            try:
                space.set_index_parameter(index, name, value)
            except RuntimeError:      # the index has no such parameter
                pass
        build_s = time.perf_counter() - t0
    finally:
        faiss.omp_set_num_threads(prev)

    def search(queries):
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if metric == "cosine":
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
        faiss.omp_set_num_threads(params.get("num_threads") or os.cpu_count() or 1)
        try:
            return index.search(queries, k)[1].astype(np.int64)
        finally:
            faiss.omp_set_num_threads(prev)

    return search, build_s
