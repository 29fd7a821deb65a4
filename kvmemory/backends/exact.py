"""backend="exact": brute force over the live entries; the reference for every other backend."""

from __future__ import annotations

import numpy as np

from ..metrics import column_transform, scores_from_ranked
from ..validation import check_int_option
from .host import HostBackend
from .topk import blocked_topk


class ExactBackend(HostBackend):
    """Exact top-k by tiled BLAS matmul and group-maxima selection over every (row, head) (see topk.py).

    Options:
        block_bytes: most bytes of float32 scores held at once per thread (default 64 MiB).
        num_threads: threads searching tiles of (row, head, queries) in large searches
            (default None: all cores). They need threadpoolctl (extra ``fast``) to run
            BLAS on one thread each; without it a search runs on one thread.
    """

    name = "exact"
    build_options = {"block_bytes": 64 << 20, "num_threads": None}

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.options["block_bytes"] = check_int_option("block_bytes", self.options["block_bytes"], maximum=1 << 40)

    def _candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        B, T, H, D = queries.shape
        C = self.config.capacity
        ring = self.ring
        sizes = ring.sizes()
        n = int(sizes.max(initial=0))      # no per-search work beyond what the fullest row holds
        q = np.ascontiguousarray(queries.transpose(0, 2, 1, 3)).reshape(B * H, T, D)
        keys = ring.keys.reshape(B * H, C, D)[:, :n]
        sq = ring.sqnorms.reshape(B * H, C)[:, :n] if ring.sqnorms is not None else None
        weight, bias = column_transform(self.config.metric, sq)
        n_valid = np.repeat(sizes, H)
        slots, ranked = blocked_topk(q, keys, n_valid, k, weight, bias, self.options["block_bytes"],
                                     self.map, self.num_threads)
        slots, ranked = (x.reshape(B, H, T, x.shape[-1]).transpose(0, 2, 1, 3) for x in (slots, ranked))
        return self.slots_to_ids(slots), scores_from_ranked(self.config.metric, ranked, queries)
