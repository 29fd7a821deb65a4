"""A numpy SegmentIndex for tests: exact within a segment, so SegmentedBackend's own logic is what gets tested."""

import io

import numpy as np

from kvmemory.backends.segment_index import SegmentIndex
from kvmemory.backends.segmented import SegmentedBackend


class FlatSegmentIndex(SegmentIndex):
    def __init__(self, metric, dim, span, build):
        super().__init__(metric, dim, span, build)
        self.keys = np.zeros((0, dim), np.float32)
        self.removed = 0
        self.removes = bool(build.get("removes", False))
        self.fail_at = build.get("fail_at")
        self.parallel = bool(build.get("parallel", False))
        self.threads_seen = []

    def add(self, keys):
        assert keys.shape[1] == self.dim and len(self.keys) + len(keys) <= self.span
        if self.fail_at is not None and len(self.keys) + len(keys) > self.fail_at:
            raise RuntimeError("simulated library failure")
        self.keys = np.concatenate([self.keys, keys])

    def remove_below(self, position):
        self.removed = max(self.removed, position)

    def batch_query(self, queries, k, threads=1):
        assert threads == 1 or self.parallel, threads
        self.threads_seen.append((len(queries), threads))
        held = len(self.keys) - (self.removed if self.removes else 0)
        assert 1 <= k <= held, (k, held)
        s = queries @ self.keys.T
        if self.metric == "l2":
            s = 2 * s - (self.keys ** 2).sum(1)
        if self.removes:
            s[:, :self.removed] = -np.inf
        # no scores: the segmented layer must re-score from the ring (the path library indices skip)
        return np.argsort(-s, axis=1, kind="stable")[:, :k].astype(np.int64), None

    def serialize(self):
        buf = io.BytesIO()
        np.save(buf, self.keys)
        return buf.getvalue()

    @classmethod
    def deserialize(cls, data, metric, dim, span, build):
        index = cls(metric, dim, span, build)
        index.keys = np.load(io.BytesIO(data))
        return index


class FlatSegmentedBackend(SegmentedBackend):
    name = "test-segmented"
    segment_index = FlatSegmentIndex
    build_options = {**SegmentedBackend.build_options, "removes": False, "fail_at": None, "parallel": False}


class LegacyFlatSegmentIndex(FlatSegmentIndex):
    """A SegmentIndex as written before batch_query took ``threads`` and returned scores."""

    def batch_query(self, queries, k):
        return super().batch_query(queries, k)[0]


class LegacySegmentedBackend(FlatSegmentedBackend):
    """Its index is legacy, and so is its search (no ``with_entries``)."""

    name = "test-legacy"
    segment_index = LegacyFlatSegmentIndex

    def search(self, queries, k):
        return super().search(queries, k)
