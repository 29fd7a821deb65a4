"""SegmentedBackend: approximate indices that stay cheap under FIFO eviction.

Approximate indices delete badly (faiss HNSW cannot remove, hnswlib's
replace-deleted is slow, ScaNN partitions go stale). So each row's stream is
cut into time-ordered *segments* of at most ``segment_size`` consecutive ids,
each with one index per head:

* new entries are appended to the newest segment's indices; a full segment is
  never touched again (sealed);
* a segment that FIFO has passed entirely is dropped whole (O(1), no deletes);
* the one segment FIFO is partway through is either told to remove the
  evicted prefix (indices that can, ``SegmentIndex.removes``), or over-fetched
  and filtered, or - once mostly evicted - searched exactly;
* a segment holding fewer than ``exact_below`` live entries, or whose index is
  not ready, is searched exactly from the ring; segments smaller than
  ``exact_below`` get no index at all (it would never be searched);
* if a library fails while adding, that segment loses its indexes and is
  searched exactly from then on (with a warning): entries already in the ring
  are never hidden;
* clearing a row drops all its segments.

Every candidate then goes through ``HostBackend.finish``: non-live ids are
dropped; unless every index searched returned exact scores, the rest are
re-scored exactly from the stored keys. Searches of the
(row, head, segment) indices run on the backend's thread pool
(``HostBackend.map``), one library thread each, except that a search with
fewer indices than threads hands the spare threads to indices that can use
them (``SegmentIndex.parallel``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from ..metrics import column_transform, scores_from_ranked, unit
from ..validation import check_int_option
from .host import HostBackend
from .segment_index import SegmentIndex
from .topk import blocked_topk


SPLIT = 2         # query chunks per thread when a search has few (row, head, segment) indices
MIN_CHUNK = 32    # fewest queries per chunk


@dataclasses.dataclass
class Segment:
    start: int                    # first stream id
    indexes: list | None          # one SegmentIndex per head; None: searched exactly from the ring
    count: int = 0                # ids [start, start + count) were added
    removed_below: int = 0        # local positions < this were removed from the indexes


class SegmentedBackend(HostBackend):
    """Base of the faiss, scann and hnsw backends; subclasses set ``segment_index``.

    Options shared by every segmented backend:
        segment_size: ids per segment (default capacity // 2: at most 3 segments are
            live; smaller segments evict at a finer grain but each search then
            visits more indices).
        exact_below: segments with fewer live entries are searched exactly (default 1024).
        num_threads: threads for index adds and searches (default None: all cores).
    """

    segment_index: type = SegmentIndex
    common_build_options = {"segment_size": None, "exact_below": 1024, "num_threads": None}
    build_options = common_build_options

    def __init__(self, config, **options):
        super().__init__(config, **options)
        o = self.options
        if o["segment_size"] is None:
            o["segment_size"] = max(1, config.capacity // 2)
        o["segment_size"] = check_int_option("segment_size", o["segment_size"], maximum=config.capacity)
        o["exact_below"] = check_int_option("exact_below", o["exact_below"], minimum=0)
        self.index_metric = "l2" if config.metric == "l2" else "ip"
        self.library_build = {k: v for k, v in o.items() if k not in self.common_build_options}
        self.segments: list[list[Segment]] = [[] for _ in range(config.batch_size)]

    # -- options -----------------------------------------------------------------
    def set_search_options(self, **options) -> None:
        super().set_search_options(**options)
        for seg in self._all_segments():
            for index in seg.indexes or ():
                index.set_query_arguments(**self.search_args)

    def _all_segments(self):
        return [seg for row in self.segments for seg in row]

    def _new_segment(self, start: int) -> Segment:
        c = self.config
        if self.options["segment_size"] < self.options["exact_below"]:
            return Segment(start, None)
        indexes = []
        for _ in range(c.num_heads):
            index = self.segment_index(self.index_metric, c.key_dim, self.options["segment_size"],
                                       self.library_build)
            index.set_query_arguments(**self.search_args)
            indexes.append(index)
        return Segment(start, indexes)

    # -- index maintenance -------------------------------------------------------------
    def _keys_for_index(self, b: int, ids: np.ndarray) -> np.ndarray:
        """Keys [H, n, D] of row b's ids, as the index stores them (unit length for cosine)."""
        slots = ids % self.config.capacity
        keys = self.ring.keys[b][:, slots]
        if self.config.metric == "cosine":
            keys = unit(keys, np.sqrt(self.ring.sqnorms[b][:, slots])[..., None])
        return keys

    def _index_add(self, start: np.ndarray, stop: np.ndarray) -> None:
        S = self.options["segment_size"]
        jobs = []  # (index, keys [n, D]); no index appears twice, so they may run in parallel
        for b in range(self.config.batch_size):
            a, e = int(start[b]), int(stop[b])
            segs = self.segments[b]
            while a < e:
                last = segs[-1] if segs else None
                if last is None or last.count >= S or last.start + last.count != a:
                    last = self._new_segment(a)
                    segs.append(last)
                n = min(S - last.count, e - a)
                if last.indexes is not None:
                    keys = self._keys_for_index(b, np.arange(a, a + n))
                    jobs.extend((last, index, np.ascontiguousarray(keys[h]))
                                for h, index in enumerate(last.indexes))
                last.count += n
                a += n
        for seg, error in zip([j[0] for j in jobs], self.map(_add_job, jobs)):
            if error is not None and seg.indexes is not None:
                seg.indexes = None
                warnings.warn(f"{self.name}: adding to the index of segment at id {seg.start} failed "
                              f"({type(error).__name__}: {error}); that segment is searched exactly from now on",
                              RuntimeWarning, stacklevel=3)
        for b in range(self.config.batch_size):
            self._evict(b)

    def _evict(self, b: int) -> None:
        lo = int(self.ring.live_start()[b])
        segs = [s for s in self.segments[b] if s.start + s.count > lo]
        if segs and segs[0].start < lo and segs[0].indexes and segs[0].indexes[0].removes:
            first = segs[0]
            first.removed_below = lo - first.start
            for index in first.indexes:
                index.remove_below(first.removed_below)
        self.segments[b] = segs

    def _index_clear(self, mask: np.ndarray) -> None:
        for b in np.flatnonzero(mask):
            self.segments[b] = []

    # -- search -------------------------------------------------------------------------
    def _plan(self, k: int):
        """[(b, h, segment, how, kq, a, e)]: how is "index" or "exact"; live ids of the segment are [a, e)."""
        lo = self.ring.live_start()
        exact_below = self.options["exact_below"]
        plan = []
        for b, segs in enumerate(self.segments):
            for seg in segs:
                a, e = max(seg.start, int(lo[b])), seg.start + seg.count
                if e <= a:
                    continue
                live, held = e - a, seg.count - seg.removed_below
                indexes = seg.indexes
                if (indexes is None or live < exact_below or not all(ix.ready() for ix in indexes)
                        or (not indexes[0].removes and 4 * live < held)):
                    how, kq = "exact", k
                else:
                    how, kq = "index", min(held, k if held == live else math.ceil(k * held / live))
                for h in range(self.config.num_heads):
                    plan.append((b, h, seg, how, kq, a, e))
        return plan

    def _search_exact(self, q: np.ndarray, b: int, h: int, a: int, e: int, k: int):
        """Ids [t, k'] and scores of the exact top-k of queries q [t, D] among row b, head h's ids [a, e)."""
        C = self.config.capacity
        if a % C + (e - a) <= C:      # no wrap: views, not copies
            slots = slice(a % C, a % C + (e - a))
        else:
            slots = np.arange(a, e) % C
        keys = self.ring.keys[b, h, slots][None]
        sq = self.ring.sqnorms[b, h, slots][None] if self.ring.sqnorms is not None else None
        weight, bias = column_transform(self.config.metric, sq)
        pos, ranked = blocked_topk(q[None], keys, np.array([e - a]), k, weight, bias)
        return np.where(pos[0] >= 0, pos[0] + a, -1), scores_from_ranked(self.config.metric, ranked[0], q)

    def _search_one(self, task, queries, index_queries):
        b, h, seg, how, kq, a, e, t0, t1, threads = task
        if how == "exact":
            return self._search_exact(queries[b, t0:t1, h], b, h, a, e, kq)
        q = np.ascontiguousarray(index_queries[b, t0:t1, h])
        index = seg.indexes[h]
        found = index.batch_query(q, kq, threads) if threads > 1 else index.batch_query(q, kq)
        # an index written before batch_query returned scores gives positions alone
        pos, scores = found if isinstance(found, tuple) else (found, None)
        return np.where(pos >= 0, pos + seg.start, -1).astype(np.int64), scores

    def _tasks(self, plan: list, T: int) -> list:
        """Plan entries with (t0, t1, threads): which queries each search takes, and its library threads.

        With fewer searches than threads, an index that can use several threads
        (``SegmentIndex.parallel``) gets the spare ones for all queries in one call,
        as the library itself would run it; other searches split the queries into
        chunks, several per thread to balance the load (graph searches cost unevenly).
        """
        if T == 0:
            return []
        threads = self.num_threads
        spare = threads // len(plan) if 0 < len(plan) < threads else 1
        chunks = max(1, min(math.ceil(SPLIT * threads / max(len(plan), 1)), T // MIN_CHUNK))
        bounds = np.linspace(0, T, chunks + 1).astype(int).tolist()
        tasks = []
        for p in plan:
            b, h, seg, how = p[:4]
            if spare > 1 and how == "index" and seg.indexes[h].parallel:
                tasks.append(p + (0, T, spare))
            else:
                tasks.extend(p + (t0, t1, 1) for t0, t1 in zip(bounds[:-1], bounds[1:]) if t1 > t0)
        return tasks

    def _candidates(self, queries: np.ndarray, k: int):
        B, T, H, _ = queries.shape
        tasks = self._tasks(self._plan(k), T)
        index_queries = unit(queries) if self.config.metric == "cosine" else queries
        results = self.map(lambda t: self._search_one(t, queries, index_queries), tasks)
        exact_scores = all(scores is not None for _, scores in results)
        # each (row, head, segment) gets its own block of columns; its query chunks fill its rows
        width = {}
        for task, (ids, _) in zip(tasks, results):
            key = (task[0], task[1], id(task[2]))
            width[key] = max(width.get(key, 0), ids.shape[1])
        start, used = {}, {}
        for (b, h, seg), w in width.items():
            start[b, h, seg] = used.get((b, h), 0)
            used[b, h] = start[b, h, seg] + w
        m = max(used.values(), default=0)
        out = np.full((B, T, H, m), -1, np.int64)
        out_scores = np.full((B, T, H, m), -np.inf, np.float32) if exact_scores else None
        for task, (ids, scores) in zip(tasks, results):
            b, h, seg, t0, t1 = task[0], task[1], task[2], task[7], task[8]
            cols = slice(start[b, h, id(seg)], start[b, h, id(seg)] + ids.shape[1])
            out[b, t0:t1, h, cols] = ids
            if exact_scores:
                out_scores[b, t0:t1, h, cols] = scores
        return out, out_scores

    # -- persistence -----------------------------------------------------------------
    def _index_state(self) -> dict:
        state, table = {}, []
        for b, segs in enumerate(self.segments):
            for seg in segs:
                i = len(table)
                table.append((b, seg.start, seg.count, seg.removed_below, seg.indexes is not None))
                for h, index in enumerate(seg.indexes or ()):
                    state[f"seg{i}/h{h}"] = np.frombuffer(index.serialize(), np.uint8)
        state["segments"] = np.array(table, np.int64).reshape(-1, 5)
        return state

    def _index_load(self, state: dict) -> None:
        if "segments" not in state:
            raise ValueError("saved memory lacks its segment table ('index/segments')")
        table = np.asarray(state["segments"])
        if table.ndim != 2 or table.shape[1] != 5 or table.dtype != np.int64:
            raise ValueError(f"saved segment table has shape {table.shape} {table.dtype}, expected (n, 5) int64")
        c, S = self.config, self.options["segment_size"]
        counts, lo = self.ring.counts, self.ring.live_start()
        self.segments = [[] for _ in range(c.batch_size)]
        for i, (b, start, count, removed, indexed) in enumerate(table.tolist()):
            if not 0 <= b < c.batch_size:
                raise ValueError(f"saved segment {i} names row {b}, memory has {c.batch_size} rows")
            prev = self.segments[b][-1] if self.segments[b] else None
            if (not 0 < count <= S or not 0 <= removed <= count or start + count > counts[b]
                    or start + count <= lo[b] or (prev is not None and start < prev.start + prev.count)):
                raise ValueError(f"saved segment {i} (row {b}, ids [{start}, {start + count}), removed {removed}) "
                                 f"does not fit row {b} (ids [{lo[b]}, {counts[b]}) live, segment_size {S})")
            indexes = None
            if indexed:
                indexes = []
                for h in range(c.num_heads):
                    name = f"seg{i}/h{h}"
                    if name not in state:
                        raise ValueError(f"saved memory lacks index {name!r}")
                    index = self.segment_index.deserialize(
                        bytes(np.asarray(state[name], np.uint8)), self.index_metric, c.key_dim, S,
                        self.library_build)
                    index.set_query_arguments(**self.search_args)
                    indexes.append(index)
            self.segments[b].append(Segment(start, indexes, count, removed))
        for b in range(c.batch_size):
            covered = sum(seg.start + seg.count - max(seg.start, int(lo[b])) for seg in self.segments[b])
            if covered != min(counts[b], c.capacity):
                raise ValueError(f"saved segments of row {b} cover {covered} live entries, the row holds "
                                 f"{min(counts[b], c.capacity)}")


def _add_job(job):
    """Add keys to one segment index; returns the exception instead of raising (the ring is already written)."""
    _, index, keys = job
    try:
        index.add(keys)
    except Exception as e:  # noqa: BLE001 - any library failure must not hide live entries
        return e
    return None
