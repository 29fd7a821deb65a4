"""The backend interface: what ``Memory(backend=...)`` drives.

``kvmemory.Memory`` is a thin facade. It checks every input (shapes, dtypes,
NaN/inf, k, rows) *before* it calls the backend, so a backend only ever sees
valid, complete requests and never has to undo half an operation. A backend
owns everything else:

* **storage** - the ring buffers of keys and values, one per (row, head), and
  the per-row stream counters. ``counts()[b]`` is the number of entries added
  to row b since its last clear; the entry with stream id ``i`` is live iff
  ``counts[b] - capacity <= i < counts[b]``, and (for ring backends) lives in
  slot ``i % capacity``. Ids are what ``SearchResult.ids`` reports.
* **the index**, if it has one, and how eviction and clearing reach it.
  Host backends (numpy storage) subclass :class:`kvmemory.backends.host.HostBackend`,
  which owns the ring and turns candidate ids from an index into finished,
  exactly scored, live-only results: an index then only has to propose ids
  (and their scores, if it computed them exactly). Device backends
  (``backend="torch"``, ``backend="jax"``) implement the whole interface on
  their own arrays.

A backend class declares:

* ``name`` - its registry name;
* ``metrics`` - the metrics it supports (subset of ``("ip", "cosine", "l2")``);
* ``build_options`` - ``{option: default}`` fixed at construction;
* ``search_options`` - ``{option: default}`` that ``Memory.set_search_options``
  may change between searches (ef, nprobe, ...). A default of ``None`` means
  "derived from the config" and is resolved by the backend's ``__init__``;
  ``check_search_options`` validates values (initial and later ones alike).

Unknown options raise ``ValueError`` naming the valid ones (done here, in
``Backend.__init__``). A backend is registered by name in
``kvmemory/backends/__init__.py`` (or by a third party through
``kvmemory.register_backend``) and imported only when first used.

Methods a backend implements (arrays are of the backend's own kind; ``convert``
turns any accepted array into it):

``add(keys [B,T,H,Dk], values [B,T,H,Dv])``
    append T entries to every row (all heads); each row keeps its last
    ``capacity`` entries, older ones are evicted and must never be returned.
``search(queries [B,T,H,Dk], k, with_entries) -> SearchResult``
    the top-k live entries of each query's (row, head), best first; slots
    beyond what a row holds are masked (ids -1, zeros elsewhere); keys and
    values None if ``with_entries`` is False.
``clear(mask [B] bool)``
    forget every entry of the masked rows; their ids restart at 0. ``mask``
    is what ``rows_mask`` made of the caller's ``rows`` (a numpy bool array
    unless the backend overrides ``rows_mask``, e.g. to keep a device mask).
``counts() -> np.ndarray [B] int64``
    entries added per row since its last clear (not capped at capacity).
``state_dict() -> dict[str, np.ndarray]`` / ``load_state_dict(state)``
    everything needed to resume exactly where the memory stopped; used by
    ``Memory.save``/``Memory.load``. Raise ``ValueError`` on a mismatched state.
"""

from __future__ import annotations

import numpy as np

from ..config import METRICS, MemoryConfig
from ..validation import FLOAT_DTYPES, rows_to_mask


class Backend:
    name = "base"
    metrics: tuple = METRICS
    build_options: dict = {}
    search_options: dict = {}
    accepted_dtypes: tuple = FLOAT_DTYPES

    def __init__(self, config: MemoryConfig, **options):
        if config.metric not in self.metrics:
            raise ValueError(
                f"backend {self.name!r} supports metric in {self.metrics}, got {config.metric!r}"
            )
        valid = {**self.build_options, **self.search_options}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for backend {self.name!r}; valid options: {sorted(valid)}"
            )
        self.config = config
        self.options = {k: options.get(k, v) for k, v in self.build_options.items()}
        self.search_args = {k: options.get(k, v) for k, v in self.search_options.items()}

    # -- options ---------------------------------------------------------------
    def set_search_options(self, **options) -> None:
        unknown = sorted(set(options) - set(self.search_options))
        if unknown:
            raise ValueError(
                f"unknown search option(s) {unknown} for backend {self.name!r}; "
                f"valid search options: {sorted(self.search_options)}"
            )
        self.search_args.update(self.check_search_options(dict(options)))

    def check_search_options(self, options: dict) -> dict:
        """Validated values of some of this backend's search options (None: the default); raise ValueError.

        Called by ``set_search_options`` before anything changes; a backend
        also passes its initial ``search_args`` through it once its build options are resolved.
        """
        return options

    def all_options(self) -> dict:
        """Resolved build and search options, as saved with the memory."""
        return {**self.options, **self.search_args}

    # -- arrays ------------------------------------------------------------------
    def convert(self, x):
        """An accepted array (already shape/dtype checked) as this backend's float array."""
        with np.errstate(over="ignore"):  # overflow to inf is reported by all_finite
            return np.ascontiguousarray(x, dtype=np.float32)

    def all_finite(self, x) -> bool:
        return bool(np.isfinite(x).all())

    def rows_mask(self, rows):
        """``Memory.clear``'s rows (None, int, ints or bool mask [B]) as the mask ``clear`` takes."""
        return rows_to_mask(rows, self.config.batch_size)

    # -- the interface -------------------------------------------------------------
    def add(self, keys, values) -> None:
        raise NotImplementedError(f"backend {self.name!r} does not implement add")

    def search(self, queries, k: int, with_entries: bool = True):
        raise NotImplementedError(f"backend {self.name!r} does not implement search")

    def clear(self, mask: np.ndarray) -> None:
        raise NotImplementedError(f"backend {self.name!r} does not implement clear")

    def counts(self) -> np.ndarray:
        raise NotImplementedError(f"backend {self.name!r} does not implement counts")

    def state_dict(self) -> dict:
        raise NotImplementedError(f"backend {self.name!r} does not implement state_dict")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"backend {self.name!r} does not implement load_state_dict")
