"""A memory sharded over devices along its batch axis: each device holds and searches its own rows.

Every leaf of a :class:`~kvmemory_jax.state.MemoryState` has the batch axis
first, and rows never interact, so the natural layout is ``P(axis)`` on
that axis: device d holds rows [d * B/n, (d+1) * B/n) of the keys, values
and counters, and nothing about a row lives anywhere else.

The operations must then run per device, which :func:`per_shard` does with
``jax.shard_map``: the function sees only its device's rows (shapes with
B/n rows) and its compiled program has no collective at all. Plain
``jax.jit`` on sharded arrays (GSPMD) is not enough: XLA's partitioner
gathers the scores of every row onto every device before ``top_k`` (an
all-gather of [B, H, T, C] floats), and a tiled scan reduces its trip count
over all rows; :func:`per_shard` avoids both.

>>> mesh = jax.make_mesh((4,), ("batch",))
>>> state = kvmemory_jax.init(8, 8, 65536, 64, device=batch_sharding(mesh))
>>> search = per_shard(functools.partial(kvmemory_jax.search, k=32), mesh)
>>> res = search(state, queries)        # queries [8, T, 8, 64], sharded the same way (or replicated)
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_sharding(mesh: Mesh, axis: str = "batch") -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh axis ``axis``, whatever their rank."""
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must be one of the mesh's axes {mesh.axis_names}, got {axis!r}")
    return NamedSharding(mesh, P(axis))


def shard(tree, mesh: Mesh, axis: str = "batch"):
    """Every array of ``tree`` (a MemoryState, a SearchResult, inputs) placed by :func:`batch_sharding`.

    The batch must divide evenly over the mesh axis.
    """
    sharding = batch_sharding(mesh, axis)
    n = mesh.shape[axis]
    for leaf in jax.tree.leaves(tree):
        if not leaf.shape or leaf.shape[0] % n:
            raise ValueError(f"every array must have a batch axis first that divides over {n} devices "
                             f"(mesh axis {axis!r}), got shape {tuple(leaf.shape)}")
    return jax.device_put(tree, sharding)


def per_shard(fn, mesh: Mesh, axis: str = "batch"):
    """``fn`` run on each device's own rows: every argument and output leaf is split along its first axis.

    ``fn`` takes and returns pytrees whose leaves all have the batch axis
    first (states, keys, values, queries, masks, search results); bind
    anything else (k, options) with ``functools.partial``. Works eagerly and
    inside ``jax.jit``, ``lax.scan`` and ``jax.grad``; under it ``fn`` sees
    B / n rows per device. The result is jitted (compiled once per shape when called eagerly).
    """
    if axis not in mesh.axis_names:
        raise ValueError(f"axis must be one of the mesh's axes {mesh.axis_names}, got {axis!r}")
    # check_vma off: the functions are row-local by construction, and the tiled scan's loop carry starts
    # from constants, which the check would ask to mark as varying over the mesh axis
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False))
