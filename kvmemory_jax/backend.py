"""backend="jax": exact top-k over ring buffers that live on a jax device.

Storage is a :class:`kvmemory_jax.ring.RingState` on ``device`` (keys, values,
squared norms where the metric needs them, int64 counts). ``add``, ``clear``
and ``search`` are jitted functional updates of it (the old buffers are
donated); nothing is copied to the host but ``counts()`` and the one bool of
the NaN/inf check.

Ids and counts are int64, so the kernels run under ``jax.enable_x64``;
the caller's own jax configuration is left as it is. ``SearchResult.ids``
is therefore an int64 jax array even when x64 is off (jnp arithmetic on it
then truncates to int32 with a warning; ``mask`` tells valid slots apart).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvmemory.backends.base import Backend
from kvmemory.result import SearchResult
from kvmemory.validation import FLOAT_DTYPES, check_int_option

from . import ring

SCORE_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


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
            f"jit; search it before the jitted step and pass the results in (see kvmemory_jax.memory_attention)"
        )
    return x


def _x64(method):
    """Run ``method`` with 64-bit jax types on, for int64 counts and ids."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return method(*args, **kwargs)
    return wrapper


_all_finite = jax.jit(lambda x: jnp.isfinite(x).all())


class JaxBackend(Backend):
    """Exact (or bfloat16-then-exact) top-k on a jax device, all rows and heads at once.

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
    """

    name = "jax"
    build_options = {"device": None, "score_dtype": "float32", "block_bytes": 256 << 20, "check_finite": True}
    search_options = {"rescore_factor": 2}
    accepted_dtypes = FLOAT_DTYPES + ("bfloat16",)

    @_x64
    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.device = resolve_device(self.options["device"])
        dtype = self.options["score_dtype"]
        if dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {dtype!r}")
        self.score_dtype = SCORE_DTYPES[dtype]
        self.options["device"] = device_name(self.device)
        self.options["score_dtype"] = jnp.dtype(self.score_dtype).name
        self.options["block_bytes"] = check_int_option("block_bytes", self.options["block_bytes"], maximum=1 << 40)
        if not isinstance(self.options["check_finite"], bool):
            raise ValueError(f"check_finite must be a bool, got {self.options['check_finite']!r}")
        self.search_args = self.check_search_options(self.search_args)

        B, H, C = config.batch_size, config.num_heads, config.capacity
        zeros = functools.partial(jnp.zeros, device=self.device)
        self.state = ring.RingState(
            keys=zeros((B, H, C, config.key_dim), jnp.float32),
            values=zeros((B, H, C, config.value_dim), jnp.float32),
            sqnorms=zeros((B, H, C), jnp.float32) if config.metric != "ip" else None,
            scan_keys=zeros((B, H, C, config.key_dim), self.score_dtype) if self.score_dtype != jnp.float32 else None,
            counts=zeros((B,), jnp.int64),
        )

    def check_search_options(self, options: dict) -> dict:
        if "rescore_factor" in options:
            options = {**options, "rescore_factor": check_int_option("rescore_factor", options["rescore_factor"])}
        return options

    # -- arrays ------------------------------------------------------------------
    @_x64
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
    @_x64
    def add(self, keys: jax.Array, values: jax.Array) -> None:
        """Append keys [B,T,H,Dk] and values [B,T,H,Dv] (float32 on ``device``)."""
        self.state = ring.add(self.state, keys, values)

    @_x64
    def clear(self, mask) -> None:
        """Forget the rows of ``mask`` [B] bool (numpy, as Memory.clear passes it, or a jax array on ``device``)."""
        if not isinstance(mask, jax.Array):
            mask = jax.device_put(np.asarray(mask, dtype=bool), self.device)
        self.state = self.state._replace(counts=ring.clear(self.state.counts, mask))

    @_x64
    def counts_array(self) -> jax.Array:
        """[B] int64 on ``device``: entries added per row since its last clear (no host sync)."""
        return jnp.copy(self.state.counts)   # the state's own buffer is donated by the next add or clear

    def counts(self) -> np.ndarray:
        return np.array(jax.device_get(self.state.counts), dtype=np.int64)

    @_x64
    def search(self, queries: jax.Array, k: int, with_entries: bool = True) -> SearchResult:
        B, T, H, _ = queries.shape
        C = self.config.capacity
        low = self.score_dtype != jnp.float32
        m = min(k * self.search_args["rescore_factor"] if low else k, C)
        if T == 0:
            return self._empty(B, T, H, k, with_entries)
        cols, rows = ring.plan_blocks(B * H, T, C, m, self.options["block_bytes"])
        return ring.search(self.state, queries, k=k, m=m, cols=cols, rows=rows, metric=self.config.metric,
                           with_entries=with_entries)

    def _empty(self, B: int, T: int, H: int, k: int, with_entries: bool) -> SearchResult:
        c = self.config
        zeros = functools.partial(jnp.zeros, device=self.device)
        return SearchResult(keys=zeros((B, T, H, k, c.key_dim), jnp.float32) if with_entries else None,
                            values=zeros((B, T, H, k, c.value_dim), jnp.float32) if with_entries else None,
                            scores=zeros((B, T, H, k), jnp.float32),
                            ids=jnp.full((B, T, H, k), -1, jnp.int64, device=self.device),
                            mask=zeros((B, T, H, k), jnp.bool_))

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """keys, values (float32), counts (int64) and, for cosine and l2, sqnorms: numpy copies, as the exact backend saves them."""
        s = self.state
        state = {"keys": s.keys, "values": s.values, "counts": s.counts}
        if s.sqnorms is not None:
            state["sqnorms"] = s.sqnorms
        return {name: np.array(arr) for name, arr in jax.device_get(state).items()}

    @_x64
    def load_state_dict(self, state: dict) -> None:
        """Load keys, values, counts and sqnorms; sqnorms are recomputed from the keys where not saved (e.g. by torch)."""
        expected = {"keys": (self.state.keys, np.float32), "values": (self.state.values, np.float32),
                    "counts": (self.state.counts, np.int64)}
        if self.state.sqnorms is not None and "sqnorms" in state:
            expected["sqnorms"] = (self.state.sqnorms, np.float32)
        arrays = {}
        for name, (current, dtype) in expected.items():
            if name not in state:
                raise ValueError(f"saved memory lacks {name!r}")
            arr = np.asarray(state[name])
            if arr.shape != current.shape or arr.dtype != dtype:
                raise ValueError(f"saved {name!r} has shape {arr.shape} dtype {arr.dtype}, "
                                 f"expected {current.shape} {np.dtype(dtype)}")
            arrays[name] = arr
        if (arrays["counts"] < 0).any():
            raise ValueError("saved 'counts' holds negative values")
        arrays = {name: jnp.array(arr, copy=True, device=self.device) for name, arr in arrays.items()}
        keys, sqnorms = arrays["keys"], arrays.get("sqnorms")
        if sqnorms is None and self.state.sqnorms is not None:
            sqnorms = jnp.sum(keys * keys, -1)
        self.state = ring.RingState(
            keys=keys, values=arrays["values"], counts=arrays["counts"], sqnorms=sqnorms,
            scan_keys=None if self.state.scan_keys is None else keys.astype(self.score_dtype),
        )
