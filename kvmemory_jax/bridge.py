"""Drive any kvmemory.Memory with jax arrays.

With ``backend="jax"`` arrays go straight to the memory (no transfer). With
a host backend (exact, faiss, scann, hnsw) each call moves its inputs to the
host in one ``jax.device_get`` and, for a search, brings the whole result
back in one ``jax.device_put``: keys, values, scores and ids are packed into
one uint32 buffer, copied once, and bit-cast apart on the device (the mask
is rebuilt there as ``ids >= 0``). Ids arrive as int32, modulo 2**31, as
``backend="jax"`` reports them (no ``jax_enable_x64`` needed). Gradients are
always stopped.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from kvmemory import Memory, SearchResult

from .backend import JaxBackend, concrete
from .state import ID_MASK


def is_device_memory(memory: Memory) -> bool:
    """True when the memory stores jax arrays (backend="jax")."""
    return isinstance(memory.backend, JaxBackend)


def _to_host(x: jax.Array, name: str) -> np.ndarray:
    return np.asarray(jax.device_get(concrete(x, name).astype(jnp.float32)))


def add(memory: Memory, keys: jax.Array, values: jax.Array) -> None:
    """Append keys [B,T,H,Dk] and values [B,T,H,Dv]; no gradient reaches the memory."""
    keys, values = concrete(keys, "keys"), concrete(values, "values")
    if is_device_memory(memory) or not isinstance(keys, jax.Array):
        memory.add(keys, values)
        return
    both = _to_host(jnp.concatenate([keys.astype(jnp.float32), values.astype(jnp.float32)], -1), "keys")
    memory.add(both[..., :keys.shape[-1]], both[..., keys.shape[-1]:])


def search(memory: Memory, queries: jax.Array, k: int, with_entries: bool = True) -> SearchResult:
    """Top-k of queries [B,T,H,Dk] as a SearchResult of jax arrays (on the queries' device for a host memory)."""
    queries = concrete(queries, "queries")
    if is_device_memory(memory) or not isinstance(queries, jax.Array):
        return memory.search(queries, k, with_entries=with_entries)
    res = memory.search(_to_host(queries, "queries"), k, with_entries=with_entries)
    devices = queries.devices()
    return result_to_device(res, next(iter(devices)) if len(devices) == 1 else None)


def clear(memory: Memory, rows) -> None:
    """Forget ``rows`` (a bool mask [B], jax or numpy, or row numbers); no host sync for a jax memory."""
    memory.clear(concrete(rows, "rows") if isinstance(rows, jax.Array) else rows)


def result_to_device(res: SearchResult, device: jax.Device | None = None) -> SearchResult:
    """A numpy SearchResult as jax arrays on ``device`` (default: jax's), with one host-to-device copy."""
    ids = np.asarray(res.ids)
    ids = np.where(ids >= 0, ids & ID_MASK, -1).astype(np.int32)   # int32: stream positions modulo 2**31
    parts = (res.keys, res.values, res.scores, ids)  # keys and values are None without entries
    flat = np.concatenate([np.ascontiguousarray(a, dtype=np.float32 if i < 3 else np.int32).reshape(-1).view(np.uint32)
                           for i, a in enumerate(parts) if a is not None])
    shapes = tuple(None if a is None else a.shape for a in parts)
    return _unpack(jax.device_put(flat, device), shapes)


@functools.partial(jax.jit, static_argnums=1)
def _unpack(flat: jax.Array, shapes: tuple) -> SearchResult:
    """flat uint32 words of keys, values, scores (float32) and ids (int32) -> SearchResult; None shapes skipped."""
    out, start = [], 0
    for i, shape in enumerate(shapes):
        if shape is None:
            out.append(None)
            continue
        words = math.prod(shape)
        part = flat[start:start + words]
        start += words
        out.append(jax.lax.bitcast_convert_type(part, jnp.int32 if i == 3 else jnp.float32).reshape(shape))
    keys, values, scores, ids = out
    return SearchResult(keys=keys, values=values, scores=scores, ids=ids, mask=ids >= 0)
