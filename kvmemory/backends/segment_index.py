"""SegmentIndex: the small interface each ANN library implements (ann-benchmarks style).

A segment index covers one contiguous span of one (row, head)'s stream. It
receives keys in stream order and names them by local position 0, 1, 2, ...
It never sees evicted ids come back: eviction is handled around it by
:class:`kvmemory.backends.segmented.SegmentedBackend`.

Metric is "ip" or "l2"; cosine reaches an index as "ip" over unit vectors.
"""

from __future__ import annotations

import numpy as np


class SegmentIndex:
    #: True if ``remove_below`` really removes entries from the search (then no over-fetch is needed)
    removes = False
    #: True if ``batch_query`` can spread one call over several library threads (``threads``)
    parallel = False

    def __init__(self, metric: str, dim: int, span: int, build: dict):
        """metric "ip"|"l2"; dim: key size; span: most entries this index will get; build: build options."""
        self.metric, self.dim, self.span, self.build = metric, dim, span, dict(build)

    def add(self, keys: np.ndarray) -> None:
        """Append keys [n, dim] float32, C-contiguous; they get the next n local positions."""
        raise NotImplementedError(f"{type(self).__name__} does not implement add")

    def ready(self) -> bool:
        """False while the index cannot answer yet (e.g. untrained): it is then searched exactly."""
        return True

    def remove_below(self, position: int) -> None:
        """Entries at local positions < ``position`` are evicted (only called if ``removes``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement remove_below")

    def set_query_arguments(self, **search) -> None:
        """Search-time parameters (ef, nprobe, ...); called before the first query and on every change."""

    def batch_query(self, queries: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        """Local positions [t, k] int64 of the approximate top-k of queries [t, dim] (-1 pads), and scores.

        Scores [t, k] float32 are the exact scores of the returned keys, higher
        closer (q.k for "ip", -|q - k|^2 for "l2"; anything at -1), when the
        index knows them (flat storage, exact reordering); else None, and the
        caller re-scores from the stored keys. They are checked against the
        stored keys by the test suite, so never return approximate ones.
        ``k`` never exceeds the number of entries the index holds (net of removals).
        Must use at most ``threads`` library threads: the caller parallelises across
        indices (and query chunks), and passes ``threads`` > 1 only to a ``parallel``
        index when a search has fewer indices than it has threads.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement batch_query")

    def serialize(self) -> bytes:
        raise NotImplementedError(f"{type(self).__name__} does not implement serialize")

    @classmethod
    def deserialize(cls, data: bytes, metric: str, dim: int, span: int, build: dict) -> "SegmentIndex":
        raise NotImplementedError(f"{cls.__name__} does not implement deserialize")
