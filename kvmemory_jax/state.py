"""The memory as a pytree, and its pure updates: ``init``, ``add``, ``clear``, ``size``.

A :class:`MemoryState` holds every (row, head) of a memory of B rows, H
heads and capacity C:

    keys      [B, H, C, Dk] float32
    values    [B, H, C, Dv] float32
    sqnorms   [B, H, C] float32, squared key norms (metrics cosine and l2; else None)
    scan_keys [B, H, C, Dk] bfloat16, what a low-precision scan multiplies (else None)
    next_slot [B] int32, the slot the row's next entry goes to
    next_id   [B] int32, the row's next stream id, modulo 2**31 (``ID_HORIZON``)
    wraps     [B] int32, how many times ``next_id`` wrapped around 2**31
    metric    "ip", "cosine" or "l2" (static: part of the pytree's structure)

Every leaf has the batch axis first, so one ``PartitionSpec("batch")`` shards
all of it (see :mod:`kvmemory_jax.sharding`).

**Ids without 64-bit integers.** A row's stream position since its last
clear is ``wraps * 2**31 + next_id``, exact up to 2**62 tokens, kept in
int32 so that nothing needs ``jax_enable_x64``. The slot of the entry with
stream position ``i`` is ``i % C``, tracked by ``next_slot`` itself (2**31
is not a multiple of C in general). Ids reported by a search are int32:
the stream position **modulo 2**31** (2,147,483,648 tokens since the row's
last clear); below that horizon they are the stream position itself, and
past it they wrap to 0 and count up again (every returned entry is still a
live one; only its id is reported modulo the horizon). The stateful
``Memory(backend="jax")`` reports exact int64 counts and saves them.

All functions are pure and shape-static: they run eagerly (compiled once
per shape) or inside a caller's ``jax.jit``, ``lax.scan``, ``jax.grad``
(writes are gradient-stopped) and ``shard_map``. Shapes and dtypes are
checked when traced; values (NaN/inf) are not, see :mod:`kvmemory_jax.checks`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kvmemory.config import MemoryConfig

from . import checks

ID_HORIZON = 2 ** 31          # ids are stream positions modulo this
ID_MASK = ID_HORIZON - 1
MAX_CAPACITY = 2 ** 30        # slot arithmetic stays within int32
SCORE_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["keys", "values", "sqnorms", "scan_keys", "next_slot", "next_id", "wraps"],
                   meta_fields=["metric"])
@dataclasses.dataclass(frozen=True)
class MemoryState:
    """A memory of B rows x H heads x C slots as a pytree; see the module docstring for the fields."""

    keys: jax.Array
    values: jax.Array
    sqnorms: jax.Array | None
    scan_keys: jax.Array | None
    next_slot: jax.Array
    next_id: jax.Array
    wraps: jax.Array
    metric: str = "ip"

    batch_size = property(lambda self: self.keys.shape[0])
    num_heads = property(lambda self: self.keys.shape[1])
    capacity = property(lambda self: self.keys.shape[2])
    key_dim = property(lambda self: self.keys.shape[3])
    value_dim = property(lambda self: self.values.shape[3])

    @property
    def score_dtype(self):
        """The dtype searches multiply keys in: float32, or the scan keys' bfloat16."""
        return jnp.float32 if self.scan_keys is None else self.scan_keys.dtype

    def replace(self, **fields) -> "MemoryState":
        return dataclasses.replace(self, **fields)


def init(batch_size: int, num_heads: int, capacity: int, key_dim: int, value_dim: int | None = None, *,
         metric: str = "ip", score_dtype: str = "float32", device=None) -> MemoryState:
    """An empty memory: ``batch_size`` rows of ``num_heads`` heads, ``capacity`` entries each.

    Args:
        metric: "ip" (q.k), "cosine" or "l2" (scores -|q-k|^2); higher is closer.
        score_dtype: "float32" (exact) or "bfloat16": searches then scan
            bfloat16 copies of the keys and re-score their candidates in float32.
        device: where the arrays are made: a ``jax.Device``, or a ``jax.sharding.Sharding``
            applying to the batch axis of every leaf, e.g. ``NamedSharding(mesh, P("batch"))``
            (see :func:`kvmemory_jax.sharding.batch_sharding`). Default: jax's default device.
    """
    c = MemoryConfig(key_dim=key_dim, value_dim=key_dim if value_dim is None else value_dim, capacity=capacity,
                     num_heads=num_heads, batch_size=batch_size, metric=metric)
    if c.capacity > MAX_CAPACITY:
        raise ValueError(f"capacity must be <= {MAX_CAPACITY} (2**30), got {c.capacity}")
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {score_dtype!r}")
    dtype = SCORE_DTYPES[score_dtype]
    B, H, C = c.batch_size, c.num_heads, c.capacity
    zeros = functools.partial(jnp.zeros, device=device)
    return MemoryState(
        keys=zeros((B, H, C, c.key_dim), jnp.float32),
        values=zeros((B, H, C, c.value_dim), jnp.float32),
        sqnorms=zeros((B, H, C), jnp.float32) if c.metric != "ip" else None,
        scan_keys=zeros((B, H, C, c.key_dim), dtype) if dtype != jnp.float32 else None,
        next_slot=zeros((B,), jnp.int32), next_id=zeros((B,), jnp.int32), wraps=zeros((B,), jnp.int32),
        metric=c.metric,
    )


def add(state: MemoryState, keys: jax.Array, values: jax.Array, *, check_finite: bool = False) -> MemoryState:
    """``state`` with keys [B, T, H, Dk] and values [B, T, H, Dv] appended to every row.

    Each row keeps its last C entries (of T > C new ones only the last C are
    written). Keys and values are stored as float32, gradient-stopped.
    ``check_finite=True`` adds ``checkify`` checks of both (see :mod:`kvmemory_jax.checks`).
    """
    keys = checks.entries(keys, "keys", state, "key_dim", state.key_dim)
    values = checks.entries(values, "values", state, "value_dim", state.value_dim, tokens=keys.shape[1])
    if check_finite:
        checks.finite(keys=keys, values=values)
    return _add(state, keys, values)


def clear(state: MemoryState, mask: jax.Array) -> MemoryState:
    """``state`` with the rows of ``mask`` [B] bool emptied: their entries become unreachable, ids restart at 0."""
    mask = checks.row_mask(mask, "mask", state.batch_size)
    return _clear(state, mask)


def size(state: MemoryState) -> jax.Array:
    """[B] int32: entries each row holds now (at most C)."""
    C = state.capacity
    return jnp.where(state.wraps > 0, C, jnp.minimum(state.next_id, C))


def stream_ids(state: MemoryState, slots: jax.Array) -> jax.Array:
    """Ids (stream positions modulo 2**31) of the entries in ``slots`` [B, ...] int32, each in [0, C)."""
    C = state.capacity
    shape = (-1,) + (1,) * (slots.ndim - 1)
    back = state.next_slot.reshape(shape) - 1 - slots             # entries written after the slot's one
    back = jnp.where(back < 0, back + C, back)
    return (state.next_id.reshape(shape) - 1 - back) & ID_MASK   # >= -C before the mask: no overflow


def _plus(a: jax.Array, t: int, C: int) -> jax.Array:
    """(a + t) % C for 0 <= a < C and a static 0 <= t < C, without int32 overflow."""
    return jnp.where(a >= C - t, a - (C - t), a + t)


def _add_impl(state: MemoryState, keys: jax.Array, values: jax.Array) -> MemoryState:
    B, T = keys.shape[:2]
    C = state.capacity
    if T == 0:
        return state
    n = min(T, C)
    keys = jax.lax.stop_gradient(keys[:, T - n:]).astype(jnp.float32)
    values = jax.lax.stop_gradient(values[:, T - n:]).astype(jnp.float32)
    first = _plus(state.next_slot, (T - n) % C, C)
    slots = first[:, None] + jnp.arange(n, dtype=jnp.int32)                    # < 2C
    slots = jnp.where(slots >= C, slots - C, slots)                           # [B, n], unique per row

    # one row at a time under vmap: the scatter's batch axis is an operand batching dim (shards cleanly)
    put = jax.vmap(lambda store, at, new: store.at[:, at].set(jnp.swapaxes(new, 0, 1).astype(store.dtype),
                                                              unique_indices=True))
    t = T % ID_HORIZON
    total = state.next_id.astype(jnp.uint32) + np.uint32(t)                    # < 2**32: exact in uint32
    return state.replace(
        keys=put(state.keys, slots, keys),
        values=put(state.values, slots, values),
        sqnorms=None if state.sqnorms is None else put(state.sqnorms, slots, jnp.sum(keys * keys, -1)),
        scan_keys=None if state.scan_keys is None else put(state.scan_keys, slots, keys),
        next_slot=_plus(state.next_slot, T % C, C),
        next_id=(total & np.uint32(ID_MASK)).astype(jnp.int32),
        wraps=state.wraps + (total >= np.uint32(ID_HORIZON)).astype(jnp.int32) + T // ID_HORIZON,
    )


def _clear_impl(state: MemoryState, mask: jax.Array) -> MemoryState:
    zero = functools.partial(jnp.where, mask, 0)
    return state.replace(next_slot=zero(state.next_slot), next_id=zero(state.next_id), wraps=zero(state.wraps))


_add, _clear = jax.jit(_add_impl), jax.jit(_clear_impl)


# -- exact int64 counts on the host (for Memory(backend="jax"), save files and the exact backend) --------


def host_counts(state: MemoryState) -> np.ndarray:
    """[B] int64 numpy: entries added per row since its last clear (one device-to-host copy)."""
    next_id, wraps = jax.device_get((state.next_id, state.wraps))
    return (np.asarray(wraps, np.int64) << 31) | np.asarray(next_id, np.int64)


def counters_from_counts(counts: np.ndarray, capacity: int) -> dict:
    """next_slot, next_id, wraps (numpy int32) for int64 ``counts`` [B] in [0, 2**62)."""
    counts = np.asarray(counts, np.int64)
    if (counts < 0).any() or (counts >= 2 ** 62).any():
        raise ValueError(f"counts must be in [0, 2**62), got {counts.tolist()}")
    return {"next_slot": (counts % capacity).astype(np.int32), "next_id": (counts & ID_MASK).astype(np.int32),
            "wraps": (counts >> 31).astype(np.int32)}
