"""kvmemory.Memory: the one key/value memory, whatever backend searches it."""

from __future__ import annotations

import os

import numpy as np

from . import persistence
from .config import MemoryConfig
from .registry import get_backend_class
from .result import SearchResult
from .validation import check_float_array, check_k


class Memory:
    """An external key/value memory: ``batch_size`` independent rows of ``num_heads`` heads.

    Each (row, head) keeps the last ``capacity`` (key, value) pairs added to
    its row since the row's last ``clear`` (FIFO), and answers top-k searches
    over them. Every input is checked before anything changes: a refused call
    leaves the memory as it was.

    Args:
        key_dim, value_dim: sizes of a key and a value (value_dim defaults to key_dim).
        capacity: entries kept per (row, head).
        num_heads, batch_size: heads per row, and rows.
        backend: a name from ``kvmemory.available_backends()``.
        metric: "ip" (dot product), "cosine" or "l2".
        **backend_options: the backend's build and search options.
    """

    def __init__(self, key_dim: int, value_dim: int | None = None, capacity: int = 65536,
                 num_heads: int = 1, batch_size: int = 1, backend: str = "exact",
                 metric: str = "ip", **backend_options):
        self.config = MemoryConfig(
            key_dim=key_dim, value_dim=key_dim if value_dim is None else value_dim,
            capacity=capacity, num_heads=num_heads, batch_size=batch_size, metric=metric,
        )
        self.backend = get_backend_class(backend)(self.config, **backend_options)

    # -- sizes -----------------------------------------------------------------
    key_dim = property(lambda self: self.config.key_dim)
    value_dim = property(lambda self: self.config.value_dim)
    capacity = property(lambda self: self.config.capacity)
    num_heads = property(lambda self: self.config.num_heads)
    batch_size = property(lambda self: self.config.batch_size)
    metric = property(lambda self: self.config.metric)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def size(self) -> np.ndarray:
        """int64 [batch]: entries each row holds now."""
        return np.minimum(self.backend.counts(), self.capacity)

    @property
    def options(self) -> dict:
        """The backend's resolved build and search options."""
        return self.backend.all_options()

    # -- operations ------------------------------------------------------------
    def _check(self, x, name: str, dim_name: str, dim: int, tokens: int | None = None):
        c = self.config
        x = check_float_array(
            x, name,
            (("batch", c.batch_size), ("tokens", tokens), ("heads", c.num_heads), (dim_name, dim)),
            self.backend.accepted_dtypes,
        )
        x = self.backend.convert(x)
        if not self.backend.all_finite(x):
            raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
        return x

    def add(self, keys, values) -> None:
        """Append keys [batch, tokens, heads, key_dim] and values [batch, tokens, heads, value_dim].

        Every row gets ``tokens`` new entries (ids continuing its stream);
        each row then keeps its last ``capacity`` entries.
        """
        keys = self._check(keys, "keys", "key_dim", self.key_dim)
        values = self._check(values, "values", "value_dim", self.value_dim, tokens=keys.shape[1])
        if keys.shape[1]:
            self.backend.add(keys, values)

    def search(self, queries, k: int = 32, *, with_entries: bool = True) -> SearchResult:
        """Top-k live entries of each query's (row, head), best first.

        queries: [batch, tokens, heads, key_dim]. Slots beyond what a row
        holds come back masked (``mask`` False, ids -1, zeros elsewhere).
        ``with_entries=False`` returns only ids, scores and mask (``keys`` and
        ``values`` are None): for callers that keep their own store, and
        cheaper, since nothing is gathered.
        """
        k = check_k(k)
        if not isinstance(with_entries, (bool, np.bool_)):
            raise TypeError(f"with_entries must be a bool, got {type(with_entries).__name__} {with_entries!r}")
        queries = self._check(queries, "queries", "key_dim", self.key_dim)
        if with_entries:     # as backends written before with_entries existed are called
            return self.backend.search(queries, k)
        return self.backend.search(queries, k, with_entries=False)

    def clear(self, rows=None) -> None:
        """Forget every entry of ``rows`` (an int, ints, or a bool mask [batch]); all rows if None."""
        self.backend.clear(self.backend.rows_mask(rows))

    def set_search_options(self, **options) -> None:
        """Change search-time options (e.g. ``ef``, ``nprobe``) for later searches."""
        self.backend.set_search_options(**options)

    # -- persistence -------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the whole memory (config, entries, stream positions, index) to one file."""
        persistence.save(path, self)

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> "Memory":
        """Read a memory written by ``save``; ``overrides`` replace saved backend options (e.g. device)."""
        return persistence.load(cls, path, **overrides)

    def __repr__(self) -> str:
        c = self.config
        return (f"Memory(key_dim={c.key_dim}, value_dim={c.value_dim}, capacity={c.capacity}, "
                f"num_heads={c.num_heads}, batch_size={c.batch_size}, backend={self.backend_name!r}, "
                f"metric={c.metric!r}, size={self.size.tolist()})")
