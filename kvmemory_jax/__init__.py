"""kvmemory for JAX: a functional memory for jit, scan and shard_map, a Flax layer, and backend="jax".

The memory is a pytree (:class:`MemoryState`) and every operation a pure function:

>>> import kvmemory_jax as kvj
>>> state = kvj.init(batch_size=4, num_heads=8, capacity=65536, key_dim=64)
>>> state = kvj.add(state, keys, values)              # keys, values [4, T, 8, 64]
>>> res = kvj.search(state, queries, k=32)            # SearchResult, ids int32
>>> state = kvj.clear(state, doc_start)               # doc_start [4] bool

They run eagerly or inside the caller's ``jax.jit``, ``lax.scan``, ``jax.grad``
(no gradient reaches the memory) and ``shard_map`` (:mod:`kvmemory_jax.sharding`),
with ``jax_enable_x64`` off. ``KNNAttention`` and ``MemorizingTransformer`` are
Flax NNX modules holding the memory as layer state (they need flax: the
``kvmemory[flax]`` extra). ``kvmemory.Memory(backend="jax")`` is the stateful
wrapper over the same functions; ``knn_attention_step`` drives any ``Memory``
eagerly, and ``bridge`` moves jax arrays to and from host backends.
"""

from . import sharding
from .attention import knn_attention, knn_attention_step, memory_attention
from .backend import JaxBackend
from .checks import checked
from .retrieve import search
from .state import ID_HORIZON, MemoryState, add, clear, init, size
from .topk import METHODS

__all__ = ["sharding", "MemoryState", "init", "add", "search", "clear", "size", "ID_HORIZON", "METHODS", "checked",
           "memory_attention", "knn_attention", "knn_attention_step", "JaxBackend",
           "KNNAttention", "KNNMemory", "MemorizingTransformer", "reset_memories", "knn_layers"]

_FLAX = {"KNNAttention": "layer", "KNNMemory": "layer", "reset_memories": "layer", "knn_layers": "layer",
         "MemorizingTransformer": "model"}


def __getattr__(name):
    """The Flax modules, imported on first use (flax is an extra of its own)."""
    if name in _FLAX:
        try:
            import flax  # noqa: F401
        except ImportError as e:
            raise ImportError(f"kvmemory_jax.{name} needs flax: pip install 'kvmemory[flax]'") from e
        import importlib
        return getattr(importlib.import_module(f".{_FLAX[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
