"""kvmemory for JAX: a device-resident backend, a bridge for host backends, and Memorizing Transformer attention.

>>> import kvmemory, kvmemory_jax
>>> mem = kvmemory.Memory(key_dim=64, capacity=65536, num_heads=8, batch_size=4, backend="jax")
>>> out = kvmemory_jax.knn_attention_step(mem, q, k, v, gate_bias, doc_start=starts)  # q, k, v [4, T, 8, 64]

Inside ``jax.jit`` use the pure :func:`memory_attention` with results searched outside it.
"""

from .attention import knn_attention_step, memory_attention
from .backend import JaxBackend

__all__ = ["JaxBackend", "memory_attention", "knn_attention_step"]
