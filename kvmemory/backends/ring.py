"""Preallocated numpy ring buffers: the storage of every host backend."""

from __future__ import annotations

import numpy as np

from ..config import MemoryConfig
from .result_buffer import ResultBuffer


class Ring:
    """Keys and values of every (row, head), FIFO per row.

    keys     [B, H, C, Dk] float32
    values   [B, H, C, Dv] float32
    sqnorms  [B, H, C] float32, squared key norms (metrics cosine and l2 only, else None)
    counts   [B] int64, entries added per row since its last clear

    Stream id ``i`` of row b lives in slot ``i % C``. Because ids restart at 0
    after a clear, a row's live slots are always the prefix ``[0, size[b])``.
    """

    def __init__(self, config: MemoryConfig):
        B, H, C = config.batch_size, config.num_heads, config.capacity
        self.config = config
        self.keys = np.zeros((B, H, C, config.key_dim), np.float32)
        self.values = np.zeros((B, H, C, config.value_dim), np.float32)
        self.sqnorms = np.zeros((B, H, C), np.float32) if config.metric != "ip" else None
        self.counts = np.zeros(B, np.int64)
        self.results = ResultBuffer()   # where gathers write: reused once no result of it is alive

    @property
    def capacity(self) -> int:
        return self.config.capacity

    def sizes(self) -> np.ndarray:
        """[B] int64: live entries per row."""
        return np.minimum(self.counts, self.capacity)

    def live_start(self) -> np.ndarray:
        """[B] int64: the oldest live id of each row."""
        return np.maximum(self.counts - self.capacity, 0)

    def write(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append keys [B,T,H,Dk] and values [B,T,H,Dv]; returns the written id range [start, stop) per row.

        Of an add longer than capacity only the last ``capacity`` tokens are
        written: the earlier ones would be evicted by the same add.
        """
        C = self.capacity
        T = keys.shape[1]
        skip = max(T - C, 0)
        keys = keys[:, skip:].transpose(0, 2, 1, 3)      # [B,H,T',Dk]
        values = values[:, skip:].transpose(0, 2, 1, 3)
        sq = None
        if self.sqnorms is not None:
            sq = np.einsum("bhtd,bhtd->bht", keys, keys)
        n = T - skip
        start = self.counts + skip
        for b in range(self.counts.shape[0]):
            slot = int(start[b] % C)
            first = min(n, C - slot)        # before the wrap
            for dst, src in ((self.keys, keys), (self.values, values), (self.sqnorms, sq)):
                if dst is None:
                    continue
                dst[b, :, slot:slot + first] = src[b, :, :first]
                if first < n:
                    dst[b, :, :n - first] = src[b, :, first:]
        self.counts += T
        return start, self.counts.copy()

    def clear(self, mask: np.ndarray) -> None:
        self.counts[mask] = 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one entry's key and value."""
        return 4 * (self.config.key_dim + self.config.value_dim)

    def _flat(self, ids: np.ndarray) -> np.ndarray:
        """Positions in ``store.reshape(B * H * C, ...)`` of ids [B, T, H, m]; ids of -1 give slot 0."""
        B, _, H, _ = ids.shape
        C = self.capacity
        rows = (np.arange(B)[:, None, None, None] * H + np.arange(H)[None, None, :, None]) * C
        return rows + np.where(ids >= 0, ids % C, 0)     # one index array: far faster than three

    def take(self, store: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``store`` [B, H, C, ...] (keys, values or sqnorms) at ids [B, T, H, m] -> [B, T, H, m, ...].

        Ids of -1 read slot 0: the caller masks them.
        """
        return np.take(store.reshape(-1, *store.shape[3:]), self._flat(ids), axis=0)

    def gather(self, ids: np.ndarray, mapper=None, parts: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Keys [B, T, H, m, Dk] and values [B, T, H, m, Dv] at ids [B, T, H, m]; zeros where ids is -1.

        ``mapper(fn, items)`` (e.g. ``HostBackend.map``) runs ``parts`` slices of the copy.
        """
        flat, empty = self._flat(ids).reshape(-1), (ids < 0).reshape(-1)
        dk, dv = self.config.key_dim, self.config.value_dim
        stores = (self.keys.reshape(-1, dk), self.values.reshape(-1, dv))
        outs = self.results.lend_rows(flat.size, (dk, dv))

        def copy(part: slice) -> None:
            for store, out in zip(stores, outs):
                np.take(store, flat[part], axis=0, out=out[part], mode="clip")   # "raise" would buffer
                out[part][empty[part]] = 0

        bounds = np.linspace(0, flat.size, max(parts, 1) + 1).astype(int)
        (mapper or _serial)(copy, [slice(a, e) for a, e in zip(bounds[:-1], bounds[1:])])
        return tuple(out.reshape(*ids.shape, out.shape[1]) for out in outs)

    def state_dict(self) -> dict:
        state = {"keys": self.keys, "values": self.values, "counts": self.counts}
        if self.sqnorms is not None:
            state["sqnorms"] = self.sqnorms
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, current in self.state_dict().items():
            if name not in state:
                raise ValueError(f"saved memory lacks {name!r}")
            arr = np.asarray(state[name])
            if arr.shape != current.shape or arr.dtype != current.dtype:
                raise ValueError(
                    f"saved {name!r} has shape {arr.shape} dtype {arr.dtype}, "
                    f"expected {current.shape} {current.dtype}"
                )
        if (np.asarray(state["counts"]) < 0).any():
            raise ValueError("saved 'counts' holds negative values")
        self.keys[...] = state["keys"]
        self.values[...] = state["values"]
        self.counts[...] = state["counts"]
        if self.sqnorms is not None:
            self.sqnorms[...] = state["sqnorms"]


def _serial(fn, items: list) -> list:
    return [fn(x) for x in items]
