"""kNN-augmented attention of Memorizing Transformers (Wu et al., 2022), functional, for JAX.

``memory_attention`` is pure and jittable: local causal attention (optionally
also over an XL cache of earlier keys and values) plus attention over
neighbours already retrieved from a memory, mixed per head by a learned gate.
Around it, one segment in the paper's order (clear rows whose document
starts, search, attend, write the segment's keys and values):

* ``knn_attention(state, ...) -> (out, state)`` - pure, on a
  :class:`~kvmemory_jax.state.MemoryState`: for jit, scan and grad;
* ``knn_attention_step(memory, ...)`` - eager, on any ``kvmemory.Memory``.

The paper L2-normalises queries and keys (with a learned scale): do that
before calling them (the Flax layer does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvmemory import Memory
from kvmemory.validation import check_float_array, check_int_option

from . import bridge
from . import retrieve as search_mod
from . import state as state_mod


@jax.jit
def memory_attention(q, k, v, mem_keys, mem_values, mem_mask, gate_bias, scale=None, xl=None):
    """out = g * memory_attention + (1 - g) * local_attention, g = sigmoid(gate_bias) per head.

    Args:
        q, k, v: [B, T, H, D] queries, keys and values of the segment (v may have its own last dim Dv).
        mem_keys, mem_values: [B, T, H, K, D] / [B, T, H, K, Dv], each query's retrieved neighbours
            (e.g. ``SearchResult.keys``/``values``); constants, no gradient reaches them.
        mem_mask: [B, T, H, K] bool, False for empty neighbour slots (left out of the softmax).
        gate_bias: [H] gate logits b_h.
        scale: logit scale, a scalar or [H] (default 1/sqrt(D)); logits are scale * q.k for both parts.
        xl: None, or (keys [B, X, H, D], values [B, X, H, Dv], valid [B, X] bool): earlier keys and
            values every query also attends to locally (Transformer-XL); invalid ones are left out.

    Returns [B, T, H, Dv] in q's dtype. A query without any neighbour (its
    row's memory is empty) takes gate 0: plain local attention, not a mix with zeros.
    """
    D = q.shape[-1]
    scale = jnp.asarray(D ** -0.5 if scale is None else scale, q.dtype)
    qs = q * (scale[:, None] if scale.ndim == 1 else scale)
    local = causal_attention(qs, k, v, xl)

    mem_keys, mem_values = (jax.lax.stop_gradient(x).astype(q.dtype) for x in (mem_keys, mem_values))
    logits = jnp.einsum("bthd,bthkd->bthk", qs, mem_keys)
    has_memory = mem_mask.any(-1, keepdims=True)                          # [B,T,H,1]
    logits = jnp.where(mem_mask, logits, -jnp.inf)
    logits = jnp.where(has_memory, logits, 0.0)                           # no NaN from an all -inf softmax
    weights = jax.nn.softmax(logits, -1) * mem_mask
    mem = jnp.einsum("bthk,bthkd->bthd", weights, mem_values)
    gate = jax.nn.sigmoid(gate_bias.astype(q.dtype))[:, None] * has_memory
    return gate * mem + (1 - gate) * local


def causal_attention(q, k, v, xl=None):
    """Softmax attention of q [B,T,H,D] (pre-scaled) over k [B,T,H,D], v [B,T,H,Dv], token t seeing 0..t.

    ``xl`` = (keys [B,X,H,D], values [B,X,H,Dv], valid [B,X]): earlier tokens
    every query sees too (gradient-stopped), where valid. Computed in q's dtype
    throughout (``jax.nn.dot_product_attention`` takes its softmax in float32,
    which loses float64 gradient checks).
    """
    B, T = q.shape[:2]
    allowed = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    if xl is not None:
        xk, xv, valid = jax.lax.stop_gradient(xl)
        k, v = jnp.concatenate([xk.astype(k.dtype), k], 1), jnp.concatenate([xv.astype(v.dtype), v], 1)
        allowed = jnp.concatenate([jnp.broadcast_to(valid[:, None, :], (B, T, valid.shape[1])), allowed], -1)
    logits = jnp.einsum("bthd,bshd->bhts", q, k)
    logits = jnp.where(allowed[:, None], logits, -jnp.inf)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)


def knn_attention(state: state_mod.MemoryState, q, k, v, gate_bias, *, doc_start=None, k_neighbours: int = 32,
                  scale=None, xl=None, update: bool = True, **search_options):
    """One segment through a kNN attention layer and its memory, purely: returns (out [B,T,H,Dv], new state).

    Clears the rows flagged by ``doc_start`` ([B] bool), retrieves the
    ``k_neighbours`` nearest stored keys of each query of q [B,T,H,D]
    (``search_options``: method, recall_target, block_bytes, ... of
    :func:`kvmemory_jax.search`), runs :func:`memory_attention` (``xl`` as
    there), then, if ``update``, writes k and v (gradient-stopped). Jittable,
    scannable; under ``jax.grad`` gradients reach q, k, v, gate_bias and
    scale, never the memory.
    """
    if doc_start is not None:
        state = state_mod.clear(state, doc_start)
    res = search_mod.search(state, q, k_neighbours, **search_options)
    out = memory_attention(q, k, v, res.keys, res.values, res.mask, gate_bias, scale, xl)
    if update:
        state = state_mod.add(state, k, v)
    return out, state


def knn_attention_step(memory: Memory, q, k, v, gate_bias, doc_start=None, k_neighbours: int = 32, scale=None):
    """One segment through a kNN attention layer and its memory; returns [B, T, H, Dv].

    Clears the rows flagged by ``doc_start`` ([B] bool), retrieves the
    ``k_neighbours`` nearest stored keys of each query of q [B,T,H,D], runs
    :func:`memory_attention`, then writes k and v (gradient-stopped) to the
    memory. Not jittable (the memory is state), but differentiable eagerly:
    under ``jax.grad`` gradients reach q, k, v, gate_bias and scale, never
    the memory, and the memory is written once.
    """
    c = memory.config
    k_neighbours = check_int_option("k_neighbours", k_neighbours)
    B, T = q.shape[:2]
    for name, x, dim in (("q", q, ("key_dim", c.key_dim)), ("k", k, ("key_dim", c.key_dim)),
                         ("v", v, ("value_dim", c.value_dim))):
        check_float_array(x, name, (("batch", c.batch_size), ("tokens", T), ("heads", c.num_heads), dim),
                          ("float16", "bfloat16", "float32", "float64"))
        bridge.concrete(x, name)  # refuse tracers before anything changes
    if doc_start is not None:
        if getattr(doc_start, "dtype", None) != jnp.bool_ or tuple(doc_start.shape) != (B,):
            raise ValueError(f"doc_start must be a bool array [batch={B}], got {getattr(doc_start, 'dtype', None)} "
                             f"{getattr(doc_start, 'shape', None)}")
        bridge.clear(memory, doc_start)
    res = bridge.search(memory, q, k_neighbours)
    out = memory_attention(q, k, v, res.keys, res.values, res.mask, gate_bias, scale)
    bridge.add(memory, k, v)
    return out
