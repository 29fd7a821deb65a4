"""ScaNN called directly, with the parameters backend="scann" uses, as one monolithic index.

The benchmark harness compares this with ``Memory(backend="scann")`` over the
same keys to measure what kvmemory's segmenting and re-scoring cost.
"""

from __future__ import annotations

import math
import time

import numpy as np
from scann.scann_ops.py import scann_ops_pybind as sop

from kvmemory.backends.scann import SCAN_PER_REORDER, ScannBackend


def build(keys, k, metric, params):
    """One ScaNN tree-AH index over keys; returns (search, build_seconds).

    keys [n, d] float32, queries [t, d] float32, metric "ip" | "cosine" | "l2";
    params: any of ScannBackend's options (num_leaves, num_leaves_to_search,
    reorder, dimensions_per_block, anisotropic_quantization_threshold,
    training_sample_size, hash_training_sample_size); the rest are the
    backend's defaults for a single segment of n = len(keys) entries.
    ``search(queries [t, d] float32) -> ids [t, k] int64`` is one search_batched_parallel call.
    """
    keys = np.ascontiguousarray(keys, np.float32)
    if metric == "cosine":
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-30)
    n = len(keys)
    p = {**ScannBackend.build_options, **ScannBackend.search_options, **params}
    leaves = p["num_leaves"] or max(1, round(math.sqrt(n)))
    leaves = max(1, min(leaves, n // 16))
    to_search = p["num_leaves_to_search"] or math.ceil(leaves / 8)
    reorder = max(k, p["reorder"])
    to_search = min(leaves, max(to_search, math.ceil(SCAN_PER_REORDER * reorder * leaves / n)))
    aqt = p["anisotropic_quantization_threshold"]
    t0 = time.perf_counter()
    config = (sop.builder(keys, k, "squared_l2" if metric == "l2" else "dot_product")
              .tree(leaves, to_search, training_sample_size=min(n, p["training_sample_size"]))
              .score_ah(p["dimensions_per_block"], training_sample_size=min(n, p["hash_training_sample_size"]),
                        anisotropic_quantization_threshold=float("nan") if aqt is None else aqt)
              .reorder(reorder).create_config())
    searcher = sop.create_searcher(keys, config, p["num_threads"] or 0)
    build_s = time.perf_counter() - t0

    def search(queries):
        queries = np.ascontiguousarray(queries, np.float32)
        if metric == "cosine":
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-30)
        ids, dist = searcher.search_batched_parallel(queries, k, reorder, to_search)
        return np.where(np.isfinite(dist), ids.astype(np.int64), -1)

    return search, build_s
