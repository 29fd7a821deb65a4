"""backend="hnsw": hnswlib graphs over time segments (see :mod:`kvmemory.backends.segmented`).

Eviction: each segment index is an ``hnswlib.Index`` sized to the segment
(``max_elements = segment_size``), fed in stream order with labels = local
positions. The one segment FIFO is partway through gets its evicted prefix
``mark_deleted`` (``removes = True``): a mark costs ~0.3 us, marked items are
still traversed (the graph stays connected) but never returned, and hnswlib
keeps exploring until it holds ``ef`` live results, so no over-fetch is
needed. ``replace_deleted`` is not used: a segment is never refilled, it is
dropped whole once FIFO has passed it, so reclaiming slots would buy nothing
and would make insertion slower.
"""

from __future__ import annotations

import os
import struct
import tempfile

import hnswlib
import numpy as np

from ..validation import check_int_option
from .segment_index import SegmentIndex
from .segmented import SegmentedBackend

_MAGIC = b"KVHNSW1\0"
_HEADER = struct.Struct("<8sqqq")        # magic, dim, count, removed


class HnswSegmentIndex(SegmentIndex):
    """One hnswlib graph over local positions ``0 .. span-1`` of one (row, head)."""

    removes = True

    def __init__(self, metric, dim, span, build, *, init=True):
        super().__init__(metric, dim, span, build)
        self.index = hnswlib.Index(space=metric, dim=dim)
        if init:
            self.index.init_index(max_elements=span, M=build["M"], ef_construction=build["ef_construction"])
        self.count = 0          # positions [0, count) were added
        self.removed = 0        # positions [0, removed) are marked deleted

    def add(self, keys):
        n = len(keys)
        self.index.add_items(keys, np.arange(self.count, self.count + n), num_threads=1)
        self.count += n

    def remove_below(self, position):
        for label in range(self.removed, min(position, self.count)):
            self.index.mark_deleted(label)
        self.removed = max(self.removed, min(position, self.count))

    def set_query_arguments(self, ef=64, **_):
        # hnswlib searches with max(ef, k) candidates, so ef < k is safe
        self.index.set_ef(ef)

    def batch_query(self, queries, k):
        """Local positions [t, k] int64 of the top-k of queries [t, dim] (one hnswlib thread)."""
        try:
            labels, _ = self.index.knn_query(queries, k=k, num_threads=1)
        except RuntimeError:
            # fewer than k live items reachable from the entry point (degenerate graphs,
            # e.g. many duplicate keys): search this segment exactly instead
            return self._brute(queries, k)
        return labels.astype(np.int64)

    def _brute(self, queries, k):
        pos = np.arange(self.removed, self.count)
        keys = self.index.get_items(pos)
        s = queries @ keys.T
        if self.metric == "l2":
            s = 2 * s - np.einsum("nd,nd->n", keys, keys)
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return pos[top].astype(np.int64)

    def serialize(self):
        """Header (magic, dim, count, removed) + hnswlib's own file format; no pickle."""
        with tempfile.TemporaryDirectory(prefix="kvmemory-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            self.index.save_index(path)
            with open(path, "rb") as f:
                body = f.read()
        return _HEADER.pack(_MAGIC, self.dim, self.count, self.removed) + body

    @classmethod
    def deserialize(cls, data, metric, dim, span, build):
        if len(data) < _HEADER.size:
            raise ValueError("saved hnsw index is truncated")
        magic, saved_dim, count, removed = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError("saved hnsw index has a bad header")
        if saved_dim != dim or not 0 <= removed <= count <= span:
            raise ValueError(f"saved hnsw index (dim {saved_dim}, {count} entries, {removed} removed) "
                             f"does not fit dim {dim}, segment size {span}")
        index = cls(metric, dim, span, build, init=False)
        with tempfile.TemporaryDirectory(prefix="kvmemory-hnsw-") as tmp:
            path = os.path.join(tmp, "index.bin")
            with open(path, "wb") as f:
                f.write(data[_HEADER.size:])
            try:
                index.index.load_index(path, max_elements=span)
            except RuntimeError as e:
                raise ValueError(f"saved hnsw index is not readable: {e}") from e
        if index.index.element_count != count or index.index.get_max_elements() != span:
            raise ValueError("saved hnsw index does not match its header")
        index.count, index.removed = count, removed
        return index


class HnswBackend(SegmentedBackend):
    """Approximate top-k with hnswlib (HNSW graphs), one graph per (row, head, segment).

    Options (besides ``segment_size``, ``exact_below``, ``num_threads`` of
    :class:`~kvmemory.backends.segmented.SegmentedBackend`):
        M: links per node (2*M on the base layer), int >= 2. More: better recall on
            hard (high intrinsic dimension) data, slower adds and searches, 8*M more
            bytes per entry. Default 16, or 32 when key_dim > 256.
        ef_construction: candidate list size while inserting, int >= 1. More: a
            slightly better graph, slower adds. Default max(64, 4*M).
        ef: candidate list size while searching, int >= 1; a search option
            (``Memory.set_search_options(ef=...)``). hnswlib uses max(ef, k), so
            ef < k is allowed. More: better recall, slower searches.
            Default 64, or 128 when segment_size > 32768.

    Defaults were measured on clustered data (key_dim 32-256, one segment of
    16384, k=32): M=16 with ef 64 gives per-segment recall@32 ~0.99; M=32
    searched ~1.5-2x slower for +0.005, ef_construction 200 built ~2x slower
    for +0.001. Merging several segments' top-k raises recall further.

    Costs: every entry is stored again in its graph (4*key_dim bytes plus
    ~8*M bytes of links), and each hnswlib graph has a fixed ~2.5 MB overhead
    (its lock tables) and ~6 ms creation time whatever its size: avoid tiny
    ``segment_size`` values outside tests. Every hnswlib call uses one thread
    (deterministic graphs; hnswlib releases the GIL): the segmented layer runs
    the adds of different (row, head) graphs, and the searches of different
    (row, head, segment) graphs, on its own thread pool.
    """

    name = "hnsw"
    metrics = ("ip", "cosine", "l2")
    segment_index = HnswSegmentIndex
    build_options = {**SegmentedBackend.build_options, "M": None, "ef_construction": None}
    search_options = {"ef": None}

    def __init__(self, config, **options):
        super().__init__(config, **options)
        o = self.options
        o["M"] = check_int_option("M", (16 if config.key_dim <= 256 else 32) if o["M"] is None else o["M"], 2)
        o["ef_construction"] = check_int_option(
            "ef_construction", max(64, 4 * o["M"]) if o["ef_construction"] is None else o["ef_construction"], 1)
        self.search_args["ef"] = self._ef(self.search_args["ef"])
        self.library_build = {"M": o["M"], "ef_construction": o["ef_construction"]}

    def _ef(self, ef):
        return check_int_option("ef", (64 if self.options["segment_size"] <= 32768 else 128) if ef is None else ef, 1)

    def set_search_options(self, **options):
        if "ef" in options:
            options["ef"] = self._ef(options["ef"])
        super().set_search_options(**options)
