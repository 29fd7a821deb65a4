"""A kvmemory.Memory seen through a probe: time spent in search and add, and recall against an exact shadow."""

from __future__ import annotations

import time

import numpy as np

import kvmemory


class ProbedMemory:
    """Wraps a Memory; ``KNNAttention.memory = ProbedMemory(memory)`` sees the same memory.

    Every add, search and clear goes to the wrapped memory, timed.
    :meth:`measure_recall` adds an empty exact memory of the same shape
    beside it (clear the wrapped one too, so the two agree), fed the same
    adds and clears from then on; every ``recall_every``-th search is
    repeated on it, and recall@k (the fraction of the exact top-k ids, over
    the slots the exact search fills, that the wrapped memory also returned)
    is accumulated. The keys written at the memory layer do not depend on
    what was retrieved, so both memories keep holding the same entries.
    """

    def __init__(self, memory: kvmemory.Memory):
        self.memory = memory
        self.shadow = None
        self.recall_every = 1
        self.seconds = {"search": 0.0, "add": 0.0}
        self.calls = {"search": 0, "add": 0}
        self.recall_hits = self.recall_total = 0

    def __getattr__(self, name):      # sizes, backend, config, ...: the wrapped memory's
        return getattr(self.__dict__["memory"], name)

    def add(self, keys, values) -> None:
        t = time.perf_counter()
        self.memory.add(keys, values)
        self._count("add", t)
        if self.shadow is not None:
            self.shadow.add(keys, values)

    def search(self, queries, k: int = 32, *, with_entries: bool = True):
        t = time.perf_counter()
        res = self.memory.search(queries, k, with_entries=with_entries)
        self._count("search", t)
        if self.shadow is not None and (self.calls["search"] - 1) % self.recall_every == 0:
            ref = self.shadow.search(queries, k, with_entries=False)
            ids = np.asarray(res.ids)
            want = ref.ids[..., :, None]
            hit = (want == ids[..., None, :]).any(-1) & ref.mask
            self.recall_hits += int(hit.sum())
            self.recall_total += int(ref.mask.sum())
        return res

    def clear(self, rows=None) -> None:
        self.memory.clear(rows)
        if self.shadow is not None:
            self.shadow.clear(rows)

    def _count(self, what: str, start: float) -> None:
        self.seconds[what] += time.perf_counter() - start
        self.calls[what] += 1

    def measure_recall(self, every: int = 4) -> None:
        c = self.memory.config
        self.shadow = kvmemory.Memory(c.key_dim, c.value_dim, c.capacity, c.num_heads, c.batch_size,
                                      backend="exact", metric=c.metric)
        self.recall_every = every

    @property
    def recall(self) -> float | None:
        return self.recall_hits / self.recall_total if self.recall_total else None

    def reset_counters(self) -> None:
        self.seconds = {"search": 0.0, "add": 0.0}
        self.calls = {"search": 0, "add": 0}
        self.recall_hits = self.recall_total = 0
