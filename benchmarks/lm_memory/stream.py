"""Documents fed segment by segment, Transformer-XL style: each batch row reads its own documents in order.

Segment ``s`` of a document ``d`` (``L`` bytes) has inputs ``d[sT : sT + T]``
and targets ``d[sT + 1 : sT + T + 1]``; a document has ``ceil((L - 1) / T)``
segments, the last padded (padding is masked out of the loss). A segment
never spans two documents, and ``doc_start`` flags the rows whose document
starts with this segment, so their memory is cleared there.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from .corpus import Document


@dataclasses.dataclass
class Batch:
    """One segment of every row; B rows, T tokens."""

    inputs: np.ndarray      # [B, T] int64
    targets: np.ndarray     # [B, T] int64
    valid: np.ndarray       # [B, T] bool: targets that count
    doc_start: np.ndarray   # [B] bool
    position: np.ndarray    # [B, T] int64: each target's position in its document (first target: 1)
    copy_offset: np.ndarray  # [B, T] int16: target's offset inside a copied passage, -1 elsewhere
    doc_index: np.ndarray   # [B] int64: which document each row reads (-1: none, the row is idle)


def segments_in(doc: Document, seg_len: int) -> int:
    return max(0, -(-(len(doc) - 1) // seg_len))


class _Rows:
    """Shared segment assembly: subclasses say which document and segment each row reads next."""

    def __init__(self, docs: list[Document], batch_size: int, seg_len: int):
        if batch_size < 1 or seg_len < 1:
            raise ValueError(f"batch_size and seg_len must be >= 1, got {batch_size}, {seg_len}")
        if not any(segments_in(d, seg_len) for d in docs):
            raise ValueError("no document has two bytes or more")
        self.docs, self.batch_size, self.seg_len = docs, batch_size, seg_len

    def _assemble(self, cursors: list[tuple[int, int] | None]) -> Batch:
        """cursors[b] = (document index, segment index) or None -> the batch."""
        B, T = self.batch_size, self.seg_len
        inputs = np.zeros((B, T), np.int64)
        targets = np.zeros((B, T), np.int64)
        valid = np.zeros((B, T), bool)
        position = np.zeros((B, T), np.int64)
        copy_offset = np.full((B, T), -1, np.int16)
        doc_start = np.zeros(B, bool)
        doc_index = np.full(B, -1, np.int64)
        for b, cur in enumerate(cursors):
            if cur is None:
                doc_start[b] = True          # an idle row holds nothing
                continue
            i, s = cur
            d = self.docs[i]
            lo = s * T
            n = min(T, len(d) - 1 - lo)
            inputs[b, :n] = d.data[lo:lo + n]
            targets[b, :n] = d.data[lo + 1:lo + 1 + n]
            valid[b, :n] = True
            position[b, :n] = np.arange(lo + 1, lo + 1 + n)
            if d.copy_offset is not None:
                copy_offset[b, :n] = d.copy_offset[lo + 1:lo + 1 + n]
            doc_start[b] = s == 0
            doc_index[b] = i
        return Batch(inputs, targets, valid, doc_start, position, copy_offset, doc_index)


class TrainStream(_Rows):
    """Endless training batches: row b reads the documents in its own seeded order, epoch after epoch.

    ``state()`` / ``load_state()`` save and restore where every row is, for resuming.
    """

    def __init__(self, docs: list[Document], batch_size: int, seg_len: int, seed: int):
        super().__init__(docs, batch_size, seg_len)
        self.seed = seed
        self.docs_idx = [i for i, d in enumerate(docs) if segments_in(d, seg_len)]
        self._rows = [{"epoch": 0, "pos": 0, "seg": 0} for _ in range(batch_size)]
        self._orders = {}

    def _order(self, row: int, epoch: int) -> list[int]:
        if (row, epoch) not in self._orders:
            order = list(self.docs_idx)
            random.Random(f"{self.seed}-{row}-{epoch}").shuffle(order)
            self._orders[row, epoch] = order
        return self._orders[row, epoch]

    def current(self, row: int) -> tuple[int, int]:
        """(document index, segment index) that ``row`` reads next."""
        r = self._rows[row]
        return self._order(row, r["epoch"])[r["pos"]], r["seg"]

    def next(self) -> Batch:
        cursors = [self.current(b) for b in range(self.batch_size)]
        batch = self._assemble(cursors)
        for b, (i, s) in enumerate(cursors):
            r = self._rows[b]
            r["seg"] += 1
            if r["seg"] >= segments_in(self.docs[i], self.seg_len):
                r["seg"], r["pos"] = 0, r["pos"] + 1
                if r["pos"] >= len(self.docs_idx):
                    r["epoch"], r["pos"] = r["epoch"] + 1, 0
        return batch

    def state(self) -> list[dict]:
        return [dict(r) for r in self._rows]

    def load_state(self, state: list[dict]) -> None:
        if len(state) != self.batch_size:
            raise ValueError(f"saved stream has {len(state)} rows, this one {self.batch_size}")
        self._rows = [dict(r) for r in state]

    def replay_batches(self):
        """Batches that rebuild every row's memory of its current document up to where it stands.

        Rows are aligned at the end: a row ``s`` segments into its document
        idles (cleared) for the first ``max_s - s`` batches, then replays its
        segments 0..s-1. Feeding these through the model (no gradient) leaves
        memories and XL caches as they were, but for keys recomputed with the
        current weights.
        """
        cur = [self.current(b) for b in range(self.batch_size)]
        n = max(s for _, s in cur)
        for step in range(n):
            yield self._assemble([(i, step - (n - s)) if step >= n - s else None for i, s in cur])


class EvalStream(_Rows):
    """Every document once, whole: documents go to rows longest first, each to the row with least work.

    Rows are independent in the model, so which documents share a batch does
    not change any document's result. Iterating yields batches until every row is done.
    """

    def __init__(self, docs: list[Document], batch_size: int, seg_len: int):
        super().__init__(docs, batch_size, seg_len)
        work = [0] * batch_size
        self.queues = [[] for _ in range(batch_size)]
        for i in sorted(range(len(docs)), key=lambda i: -len(docs[i])):
            n = segments_in(docs[i], seg_len)
            if n:
                b = min(range(batch_size), key=lambda r: work[r])
                self.queues[b].append(i)
                work[b] += n
        self.steps = max(work)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        plans = [[(i, s) for i in q for s in range(segments_in(self.docs[i], self.seg_len))] for q in self.queues]
        for step in range(self.steps):
            yield self._assemble([p[step] if step < len(p) else None for p in plans])
