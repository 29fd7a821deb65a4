"""The PyTorch port people use today, behind the step benchmark's memory interface (issue 12).

``lucidrains/memorizing-transformers-pytorch``'s ``KNNMemory`` keeps, per
index, a faiss ``IndexHNSWFlat`` (M = 15, inner product) and a memmap of
keys and values, and adds and searches its indices through joblib. Its
native form has one index per batch row shared by all heads; the step
benchmark gives it one index per (row, head), as kvmemory has, so both do
the same search.

It is not FIFO: an index that would exceed ``max_memories`` is reset, and
afterwards holds only what was added since. ``PortMemory`` therefore gets
room for everything the benchmark adds (see ``benchmarks.step``), and its
recall is measured against exact search over what it holds.

    pip install --no-deps memorizing-transformers-pytorch einops einops-exts joblib filelock

(its own requirements pull faiss-gpu; faiss-cpu and torch are what it needs here).
"""

from __future__ import annotations

import os
import tempfile
from types import SimpleNamespace

import numpy as np

LABEL = "port"
FILL_CHUNK = 8192     # tokens per add while filling (each add pickles every index to joblib workers and back)


def load_port_class():
    """``KNNMemory`` of memorizing_transformers_pytorch; ImportError naming the install command if absent."""
    try:
        from memorizing_transformers_pytorch.knn_memory import KNNMemory
    except ImportError as e:
        raise ImportError(f"{e}; install the port with: pip install --no-deps memorizing-transformers-pytorch "
                          "einops einops-exts joblib filelock") from None
    return KNNMemory


class PortMemory:
    """One port index per (row, head): add keys [B, T, H, D], search queries [B, T, H, D] like kvmemory.Memory.

    ``knn_class`` is the port's KNNMemory (or a stand-in with its interface:
    ``KNNMemory(dim, max_memories, num_indices, memmap_filename)``,
    ``.add(memories [I, n, 2, D] tensor)``, ``.search(queries [I, T, D] tensor, topk)``
    -> (key_values [I, T, k, 2, D], mask [I, T, k]), ``.db`` [I, max_memories, 2, D] what was added, in order).
    """

    def __init__(self, batch: int, heads: int, dim: int, max_memories: int, knn_class=None, directory=None):
        import torch
        self.torch = torch
        self.B, self.H, self.D = batch, heads, dim
        self.dir = tempfile.TemporaryDirectory(prefix="kvmemory_port_", dir=directory)
        knn_class = knn_class or load_port_class()
        self.port = knn_class(dim, max_memories=max_memories, num_indices=batch * heads,
                              memmap_filename=os.path.join(self.dir.name, "port.memmap"))
        self.options = {"index": "faiss IndexHNSWFlat M=15 (port defaults)", "max_memories": max_memories,
                        "indices": batch * heads}
        self.count = 0

    def _flat(self, x: np.ndarray) -> np.ndarray:
        """[B, T, H, D] -> [B * H, T, D]."""
        B, T, H, D = x.shape
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B * H, T, D))

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        k, v = self._flat(keys), self._flat(values)
        self.port.add(self.torch.from_numpy(np.stack([k, v], 2)))       # [I, T, 2, D]
        self.count += k.shape[1]

    def search(self, queries: np.ndarray, k: int, with_entries: bool = True):
        """SimpleNamespace(keys, values [B, T, H, k, D], mask [B, T, H, k]); entries are always fetched."""
        kv, mask = self.port.search(self.torch.from_numpy(self._flat(queries)), k)
        B, H = self.B, self.H
        T = queries.shape[1]

        def back(x):          # [I, T, k, ...] -> [B, T, H, k, ...]
            x = np.asarray(x).reshape(B, H, T, *x.shape[2:])
            return np.moveaxis(x, 1, 2)

        kv, mask = back(kv.numpy()), back(mask.numpy())
        return SimpleNamespace(keys=kv[..., 0, :], values=kv[..., 1, :], mask=mask)

    def exact_scores(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Exact top-k scores [B, T, H, k] over every key this port holds (its recall's reference)."""
        q = self._flat(queries)                                          # [I, T, D]
        top = np.empty((*q.shape[:2], k), np.float32)
        for i in range(q.shape[0]):                                      # one index at a time: [T, n] scores
            s = q[i] @ np.asarray(self.port.db[i, :self.count, 0]).T       # it never wrapped: ids 0..count-1
            top[i] = -np.sort(-np.partition(s, s.shape[-1] - k, -1)[:, -k:], -1)
        B, H = self.B, self.H
        return np.moveaxis(top.reshape(B, H, q.shape[1], k), 1, 2)
