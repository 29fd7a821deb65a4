"""ResultBuffer: memory for search results, lent out and taken back when the last array using it dies."""

from __future__ import annotations

import weakref

import numpy as np


class ResultBuffer:
    """Lends float32 buffers for the keys and values a search returns.

    A fresh buffer of a step's size (268 MB at batch 4 x 8 heads x 512 queries x k = 32, dim 64) is
    a fresh mapping: its page faults cost as much as the copy into it, and with transparent huge
    pages some searches stall several times longer (measured: gather 38 ms usually, 113-119 ms at
    times; 28-30 ms with the buffer reused). ``lend_rows`` returns views of an array made from a ``_Lease``, which
    every view of it, and anything made from a view (e.g. ``torch.from_numpy``), keeps alive; when
    the last of them dies the buffer comes back here for the next search. At most one buffer is
    kept, and one over twice the size asked for is dropped rather than reused.
    """

    def __init__(self):
        self._free: list[np.ndarray] = []

    def lend_rows(self, rows: int, widths) -> list[np.ndarray]:
        """One float32 array [rows, w] per width, all in one buffer that no earlier result still uses
        (contents undefined): a search's keys and values, say."""
        n = rows * sum(widths)
        try:
            buf = self._free.pop()
        except IndexError:
            buf = None
        if buf is None or buf.size < n or buf.size > 2 * n:
            buf = None                                  # released before the new one is allocated
            buf = np.empty(n, np.float32)
        lease = _Lease(buf[:n])
        weakref.finalize(lease, _give_back, self._free, buf)
        whole, parts, at = np.asarray(lease), [], 0
        for w in widths:
            parts.append(whole[at:at + rows * w].reshape(rows, w))
            at += rows * w
        return parts


class _Lease:
    """Lends one buffer to numpy: the arrays made from it keep it, and so the buffer, alive."""

    def __init__(self, buf: np.ndarray):
        self.buf = buf
        self.__array_interface__ = buf.__array_interface__


def _give_back(free: list, buf: np.ndarray) -> None:
    free[:] = [buf]
