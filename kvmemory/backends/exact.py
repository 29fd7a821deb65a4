"""backend="exact": brute force over the live entries; the reference for every other backend."""

from __future__ import annotations

import os

import numpy as np

from ..metrics import column_transform
from ..validation import check_int_option
from .host import HostBackend
from .topk import blocked_topk


class ExactBackend(HostBackend):
    """Exact top-k by blocked batched matmul over all (row, head) pairs at once.

    Options:
        block_bytes: most bytes of float32 scores held at once per thread (default 64 MiB).
        num_threads: threads searching blocks of (row, head) indices (default: all cores).
    """

    name = "exact"
    build_options = {"block_bytes": 64 << 20, "num_threads": None}

    def __init__(self, config, **options):
        super().__init__(config, **options)
        if self.options["num_threads"] is None:
            self.options["num_threads"] = os.cpu_count() or 1
        for name in ("block_bytes", "num_threads"):
            self.options[name] = check_int_option(name, self.options[name])

    def _candidate_ids(self, queries: np.ndarray, k: int) -> np.ndarray:
        B, T, H, D = queries.shape
        C = self.config.capacity
        ring = self.ring
        q = np.ascontiguousarray(queries.transpose(0, 2, 1, 3)).reshape(B * H, T, D)
        keys = ring.keys.reshape(B * H, C, D)
        sq = ring.sqnorms.reshape(B * H, C) if ring.sqnorms is not None else None
        weight, bias = column_transform(self.config.metric, sq)
        n_valid = np.repeat(ring.sizes(), H)
        slots = blocked_topk(q, keys, n_valid, k, weight, bias, self.options["block_bytes"],
                             self.options["num_threads"])
        slots = slots.reshape(B, H, T, slots.shape[-1]).transpose(0, 2, 1, 3)
        return self.slots_to_ids(slots)
