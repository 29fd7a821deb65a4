"""backend="jax": ``kvmemory.Memory`` as a thin stateful wrapper over the functional API.

Storage is a :class:`kvmemory_jax.state.MemoryState` on ``device``; ``add``,
``clear`` and ``search`` are the pure functions of :mod:`kvmemory_jax.state`
and :mod:`kvmemory_jax.search`, jitted with the old state donated. Nothing is
copied to the host but ``counts()`` and the one bool of the NaN/inf check.

Nothing needs ``jax_enable_x64``: counters are int32 (a split counter, exact
up to 2**62 tokens), ``counts()`` and saved files hold exact int64 counts,
and ``SearchResult.ids`` is an **int32** jax array: the stream position
modulo 2**31 (see :mod:`kvmemory_jax.state`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from kvmemory.backends.base import Backend
from kvmemory.result import SearchResult
from kvmemory.validation import FLOAT_DTYPES, check_int_option

from . import retrieve as search_mod
from . import state as state_mod
from . import topk
from .state import SCORE_DTYPES


def resolve_device(device) -> jax.Device:
    """A jax Device from None (jax's default device), a Device, or a name: "cpu", "gpu", "cuda:1", "tpu:0"."""
    if device is None:
        device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if not isinstance(device, str):
        raise ValueError(f"device must be a jax Device or its name ('cpu', 'gpu:0', ...), got {device!r}")
    platform, _, index = device.partition(":")
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(f"device must be a jax Device or its name ('cpu', 'gpu:0', ...), got {device!r}: {e}") from None


def device_name(device: jax.Device) -> str:
    """'cpu:0', 'gpu:1', ...: the platform and the device's position among that platform's devices."""
    return f"{device.platform}:{jax.devices(device.platform).index(device)}"


def concrete(x, name: str = "array"):
    """``x`` detached from any gradient; a TypeError if it is traced (the memory is state, not a function)."""
    x = jax.lax.stop_gradient(x)
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} is traced (inside jax.jit, vmap or scan): a Memory is stateful and runs outside "
            f"jit; inside jit use the functional API (kvmemory_jax.init, add, search, clear) or "
            f"the Flax layer kvmemory_jax.KNNAttention"
        )
    return x


_all_finite = jax.jit(lambda x: jnp.isfinite(x).all())
_add = jax.jit(state_mod._add_impl, donate_argnums=0)
_clear_counters = jax.jit(lambda counters, mask: tuple(jnp.where(mask, 0, c) for c in counters), donate_argnums=0)


class JaxBackend(Backend):
    """Exact (or bfloat16-then-exact, or approximate) top-k on a jax device, all rows and heads at once.

    Build options:
        device: where storage lives and results are returned (a jax Device,
            "cpu", "gpu", "gpu:1", ...; default: jax's default device). Saved as "platform:index".
        score_dtype: dtype of the scan matmul, "float32" (exact) or "bfloat16";
            bfloat16 fetches ``rescore_factor * k`` candidates and re-scores
            them exactly in float32 before the final top-k.
        block_bytes: most bytes of float32 scores per scan tile (default 256 MiB);
            the scan walks capacity in tiles and merges their top-k.
        check_finite: refuse NaN/inf inputs (default True); the check reads one
            bool back from the device per call, False removes that sync.
    Search options:
        rescore_factor: bfloat16 candidates per query = rescore_factor * k (default 2).
        method: "exact" (default), "approx_max_k" or "bins" (see :mod:`kvmemory_jax.topk`).
        recall_target: expected recall of the approximate methods (default 0.95).
    """

    name = "jax"
    build_options = {"device": None, "score_dtype": "float32", "block_bytes": search_mod.DEFAULT_BLOCK_BYTES,
                     "check_finite": True}
    search_options = {"rescore_factor": 2, "method": "exact", "recall_target": 0.95}
    accepted_dtypes = FLOAT_DTYPES + ("bfloat16",)

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.device = resolve_device(self.options["device"])
        dtype = self.options["score_dtype"]
        if dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {dtype!r}")
        self.options["device"] = device_name(self.device)
        self.options["score_dtype"] = jnp.dtype(SCORE_DTYPES[dtype]).name
        self.options["block_bytes"] = check_int_option("block_bytes", self.options["block_bytes"], maximum=1 << 40)
        if not isinstance(self.options["check_finite"], bool):
            raise ValueError(f"check_finite must be a bool, got {self.options['check_finite']!r}")
        self.search_args = self.check_search_options(self.search_args)
        c = config
        self.state = state_mod.init(c.batch_size, c.num_heads, c.capacity, c.key_dim, c.value_dim,
                                    metric=c.metric, score_dtype=self.options["score_dtype"], device=self.device)

    def check_search_options(self, options: dict) -> dict:
        options = dict(options)
        if "rescore_factor" in options:
            options["rescore_factor"] = check_int_option("rescore_factor", options["rescore_factor"])
        if "method" in options and options["method"] not in topk.METHODS:
            raise ValueError(f"method must be one of {topk.METHODS}, got {options['method']!r}")
        if "recall_target" in options:
            r = options["recall_target"]
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
                raise ValueError(f"recall_target must be a float in (0, 1], got {r!r}")
            options["recall_target"] = float(r)
        return options

    # -- arrays ------------------------------------------------------------------
    def convert(self, x) -> jax.Array:
        """A jax array on ``device`` or a host array (numpy, list) as a float32 jax array on ``device``.

        Gradients are stopped; jax arrays on another device are refused rather than silently copied.
        """
        if isinstance(x, jax.Array):
            x = concrete(x)
            if x.devices() != {self.device}:
                raise ValueError(
                    f"array is on {sorted(map(str, x.devices()))} but this memory lives on {self.device}; "
                    f"jax.device_put it there or build the memory with device={device_name(next(iter(x.devices())))!r}"
                )
            return x.astype(jnp.float32)
        with np.errstate(over="ignore"):  # overflow to inf is reported by all_finite
            return jax.device_put(np.asarray(x, dtype=np.float32), self.device)

    def all_finite(self, x: jax.Array) -> bool:
        return not self.options["check_finite"] or bool(_all_finite(x))

    def rows_mask(self, rows):
        """A jax bool array [B] on ``device`` is kept as it is (no host sync); anything else as in Memory.clear."""
        if isinstance(rows, jax.Array) and rows.dtype == jnp.bool_ and rows.devices() == {self.device}:
            B = self.config.batch_size
            if rows.shape != (B,):
                raise ValueError(f"rows as a bool mask must have shape ({B},), got {rows.shape}")
            return concrete(rows, "rows")
        return super().rows_mask(rows)

    # -- the interface -------------------------------------------------------------
    def add(self, keys: jax.Array, values: jax.Array) -> None:
        """Append keys [B,T,H,Dk] and values [B,T,H,Dv] (float32 on ``device``)."""
        self.state = _add(self.state, keys, values)

    def clear(self, mask) -> None:
        """Forget the rows of ``mask`` [B] bool (numpy, as Memory.clear passes it, or a jax array on ``device``)."""
        if not isinstance(mask, jax.Array):
            mask = jax.device_put(np.asarray(mask, dtype=bool), self.device)
        s = self.state        # as state.clear, on the counters alone: compiled once per batch size
        next_slot, next_id, wraps = _clear_counters((s.next_slot, s.next_id, s.wraps), mask)
        self.state = s.replace(next_slot=next_slot, next_id=next_id, wraps=wraps)

    def size_array(self) -> jax.Array:
        """[B] int32 on ``device``: entries each row holds now (no host sync)."""
        return state_mod.size(self.state)

    def counts(self) -> np.ndarray:
        return state_mod.host_counts(self.state)

    def search(self, queries: jax.Array, k: int, with_entries: bool = True) -> SearchResult:
        a = self.search_args
        return search_mod.search(self.state, queries, k, method=a["method"], recall_target=a["recall_target"],
                                 rescore_factor=a["rescore_factor"], block_bytes=self.options["block_bytes"],
                                 with_entries=with_entries)

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """keys, values (float32), counts (int64) and, for cosine and l2, sqnorms: numpy copies, as the exact backend saves them."""
        s = self.state
        state = {"keys": s.keys, "values": s.values}
        if s.sqnorms is not None:
            state["sqnorms"] = s.sqnorms
        state = {name: np.array(arr) for name, arr in jax.device_get(state).items()}
        state["counts"] = state_mod.host_counts(s)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load keys, values, counts and sqnorms; sqnorms are recomputed from the keys where not saved (e.g. by torch)."""
        s, C = self.state, self.config.capacity
        expected = {"keys": (s.keys.shape, np.float32), "values": (s.values.shape, np.float32),
                    "counts": ((self.config.batch_size,), np.int64)}
        if s.sqnorms is not None and "sqnorms" in state:
            expected["sqnorms"] = (s.sqnorms.shape, np.float32)
        arrays = {}
        for name, (shape, dtype) in expected.items():
            if name not in state:
                raise ValueError(f"saved memory lacks {name!r}")
            arr = np.asarray(state[name])
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"saved {name!r} has shape {arr.shape} dtype {arr.dtype}, "
                                 f"expected {shape} {np.dtype(dtype)}")
            arrays[name] = arr
        if (arrays["counts"] < 0).any():
            raise ValueError("saved 'counts' holds negative values")
        counters = state_mod.counters_from_counts(arrays.pop("counts"), C)
        arrays = {name: jnp.array(arr, copy=True, device=self.device) for name, arr in {**arrays, **counters}.items()}
        keys, sqnorms = arrays["keys"], arrays.get("sqnorms")
        if sqnorms is None and s.sqnorms is not None:
            sqnorms = jnp.sum(keys * keys, -1)
        self.state = s.replace(
            keys=keys, values=arrays["values"], sqnorms=sqnorms,
            scan_keys=None if s.scan_keys is None else keys.astype(s.scan_keys.dtype),
            next_slot=arrays["next_slot"], next_id=arrays["next_id"], wraps=arrays["wraps"],
        )
