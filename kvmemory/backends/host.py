"""HostBackend: numpy ring storage plus the pipeline from candidate ids to results.

A host backend only has to propose candidate ids per query, with their
scores if it knows them exactly (``_candidates``); this class drops any
that are not live (evicted, cleared, out of range), scores the rest exactly
from the stored keys unless scores came with them, keeps the k best, sorts
them best first, masks what is missing and gathers the stored keys and
values. Whatever an index returns, no evicted or cleared entry can reach
the caller.

Index hooks a subclass may override:

``_index_add(start [B], stop [B])``  ids [start[b], stop[b]) of row b were just written
``_index_clear(mask [B])``           those rows were just cleared (counts already 0)
``_index_state()`` / ``_index_load(state)``  extra arrays to persist

A backend that declares a ``num_threads`` option gets ``self.num_threads``
(None: all cores; saved unresolved, so a loaded memory uses its new machine's
cores) and ``self.map``, which runs work on one pool of that many threads.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np

from ..metrics import score_candidates
from ..result import SearchResult
from ..validation import check_int_option
from .base import Backend
from .ring import Ring

GATHER_PART_BYTES = 1 << 20   # a search gathering fewer bytes of keys and values runs the gather on one thread


class HostBackend(Backend):
    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.ring = Ring(config)
        threads = self.options.get("num_threads")
        if threads is not None:
            threads = self.options["num_threads"] = check_int_option("num_threads", threads, maximum=4096)
        self.num_threads = threads or os.cpu_count() or 1
        self._pool = None

    def map(self, fn, items: list) -> list:
        """``[fn(x) for x in items]``, on this backend's thread pool when there is more than one item."""
        if self.num_threads == 1 or len(items) < 2:
            return [fn(x) for x in items]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, f"kvmemory-{self.name}")
        return list(self._pool.map(fn, items))

    # -- interface -------------------------------------------------------------
    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        start, stop = self.ring.write(keys, values)
        self._index_add(start, stop)

    def clear(self, mask: np.ndarray) -> None:
        self.ring.clear(mask)
        self._index_clear(mask)

    def counts(self) -> np.ndarray:
        return self.ring.counts.copy()

    def search(self, queries: np.ndarray, k: int, with_entries: bool = True) -> SearchResult:
        ids, scores = self._candidates(queries, k)
        return self.finish(queries, ids, k, scores, with_entries)

    def state_dict(self) -> dict:
        state = dict(self.ring.state_dict())
        state.update({f"index/{k}": v for k, v in self._index_state().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.ring.load_state_dict(state)
        self._index_load({k[len("index/"):]: v for k, v in state.items() if k.startswith("index/")})

    # -- what subclasses provide -------------------------------------------------------
    def _candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Candidate stream ids [B, T, H, m] (any m, -1 for none, no duplicates) and their scores.

        Scores [B, T, H, m] float32 are the metric's exact scores of those ids
        (as ``metrics.score_candidates`` defines them, up to float rounding),
        or None to have ``finish`` compute them from the stored keys.
        """
        raise NotImplementedError

    def _index_add(self, start: np.ndarray, stop: np.ndarray) -> None:
        pass

    def _index_clear(self, mask: np.ndarray) -> None:
        pass

    def _index_state(self) -> dict:
        return {}

    def _index_load(self, state: dict) -> None:
        pass

    # -- shared helpers -------------------------------------------------------------
    def slots_to_ids(self, slots: np.ndarray) -> np.ndarray:
        """Ring slots [B, ...] of live entries to their stream ids; -1 stays -1."""
        C = self.config.capacity
        lo = self.ring.live_start().reshape((-1,) + (1,) * (slots.ndim - 1))
        return np.where(slots >= 0, lo + (slots - lo) % C, -1)

    def finish(self, queries: np.ndarray, ids: np.ndarray, k: int, scores: np.ndarray | None = None,
               with_entries: bool = True) -> SearchResult:
        """Turn candidates (see ``_candidates``) into the top-k SearchResult (live entries only, exact scores).

        ``with_entries=False`` leaves keys and values None (nothing is gathered).
        """
        B, T, H, _ = queries.shape
        ring = self.ring
        counts = ring.counts[:, None, None, None]
        lo = ring.live_start()[:, None, None, None]
        live = (ids >= lo) & (ids < counts)
        ids = np.where(live, ids, -1)
        if scores is None:
            sq = ring.take(ring.sqnorms, ids) if ring.sqnorms is not None else None
            scores = score_candidates(self.config.metric, queries, ring.take(ring.keys, ids), sq)
        scores = np.where(live, scores.astype(np.float32, copy=False), -np.inf)
        m = ids.shape[-1]
        if m > k:  # keep the k best, then sort only those
            top = np.argpartition(scores, m - k, axis=-1)[..., m - k:]
            ids, scores = np.take_along_axis(ids, top, -1), np.take_along_axis(scores, top, -1)
        order = np.argsort(-scores, axis=-1, kind="stable")
        ids, scores = np.take_along_axis(ids, order, -1), np.take_along_axis(scores, order, -1)
        if m < k:
            ids = np.concatenate([ids, np.full((B, T, H, k - m), -1, np.int64)], -1)
            scores = np.concatenate([scores, np.zeros((B, T, H, k - m), np.float32)], -1)
        mask = ids >= 0
        scores[~mask] = 0
        keys = values = None
        if with_entries:
            # big gathers are split over the pool: numpy releases the GIL while it copies
            parts = min(self.num_threads, max(1, ids.size * ring.row_bytes // GATHER_PART_BYTES))
            keys, values = ring.gather(ids, self.map, parts)
        return SearchResult(keys=keys, values=values, scores=scores, ids=ids.astype(np.int64, copy=False),
                            mask=mask)
