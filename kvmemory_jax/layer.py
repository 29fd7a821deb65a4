"""KNNAttention as a Flax NNX module: the memory is layer state, threaded through jit, scan and grad.

Flax NNX is what Flax recommends for new code (Linen is maintained, not
developed): modules are Python objects owning their variables, and a
variable type of our own (:class:`KNNMemory`) keeps the memory apart from
the parameters. ``nnx.jit`` / ``nnx.value_and_grad`` carry its updates out
of a jitted step; ``nnx.split(model, nnx.Param, ...)`` hands parameters and
memory to plain ``jax.jit`` / ``lax.scan`` as two pytrees (see
``examples/train_flax_memory.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kvmemory.validation import check_int_option

from . import retrieve as search_mod
from . import state as state_mod
from .attention import memory_attention
from .sharding import batch_sharding, per_shard


class KNNMemory(nnx.Variable):
    """A layer's kNN memory: a :class:`~kvmemory_jax.state.MemoryState`. Not a parameter: never trained."""


class XLCache(nnx.Variable):
    """A layer's Transformer-XL cache: (keys [B, X, H, D], values [B, X, H, D], valid [B, X] bool)."""


@functools.lru_cache(maxsize=None)
def memory_ops(mesh, axis: str, search_options: tuple):
    """(clear, search, add) of the functional API, per device (``shard_map``) when ``mesh`` is given."""
    search = functools.partial(search_mod.search, **dict(search_options))
    ops = (state_mod.clear, search, state_mod.add)
    return ops if mesh is None else tuple(per_shard(op, mesh, axis) for op in ops)


class KNNAttention(nnx.Module):
    """Causal self-attention over the segment plus attention over k neighbours from a memory.

    The layer of ``kvmemory_torch.KNNAttention``, in NNX. Per segment (the
    paper's order): rows flagged by ``doc_start`` are cleared (memory and XL
    cache), every query retrieves its top-k (key, value) pairs from its own
    (row, head) of the memory, local and memory attention are computed, and
    the segment's keys and values are written to the memory, gradient-stopped.
    Per head h the two are mixed by a learned gate ``g_h = sigmoid(b_h)``:
    ``out = g * memory_attention + (1 - g) * local_attention``; a query with
    no neighbour (its row's memory is empty) takes g = 0.

    Args:
        dim: model width; input and output are [batch, tokens, dim].
        num_heads, head_dim: attention heads and the size of each.
        batch_size: rows of the memory; inputs must have this batch (each
            batch row owns one memory row).
        capacity: entries kept per (row, head).
        k: neighbours retrieved per query and head.
        normalize_qk: L2-normalise queries and keys, with a learned per-head
            logit scale exp(log_scale) initialised to ``init_scale`` (default
            sqrt(head_dim)). Off: logits are q.k / sqrt(head_dim).
        xl_len: tokens of the XL cache: every query also attends locally to
            the last ``xl_len`` keys and values before the segment (0: none;
            the torch layer's ``xl_cache=True`` is xl_len = segment length).
        gate_init: initial gate bias b (g = sigmoid(b)).
        use_bias: whether the q/k/v/out projections have biases.
        metric, score_dtype: of the memory (see :func:`kvmemory_jax.init`).
        method, recall_target, block_bytes: of its search (see :func:`kvmemory_jax.search`).
        mesh, batch_axis: shard the memory over ``mesh`` along the batch
            (each device holds and searches its own rows, see :mod:`kvmemory_jax.sharding`).
        rngs: ``nnx.Rngs`` for the projections.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, batch_size: int, capacity: int, k: int = 32,
                 normalize_qk: bool = True, init_scale: float | None = None, xl_len: int = 0,
                 gate_init: float = 0.0, use_bias: bool = False, metric: str = "ip", score_dtype: str = "float32",
                 method: str = "exact", recall_target: float = 0.95,
                 block_bytes: int = search_mod.DEFAULT_BLOCK_BYTES, mesh=None, batch_axis: str = "batch",
                 rngs: nnx.Rngs):
        dim, num_heads, head_dim, k = (check_int_option(name, value) for name, value in
                                       (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim), ("k", k)))
        xl_len = check_int_option("xl_len", xl_len, minimum=0)
        self.dim, self.num_heads, self.head_dim, self.k = dim, num_heads, head_dim, k
        self.normalize_qk, self.xl_len = bool(normalize_qk), xl_len
        self.mesh, self.batch_axis = mesh, batch_axis
        inner = num_heads * head_dim
        linear = functools.partial(nnx.Linear, use_bias=use_bias, rngs=rngs)
        self.to_q, self.to_k, self.to_v = linear(dim, inner), linear(dim, inner), linear(dim, inner)
        self.to_out = linear(inner, dim)
        self.gate_bias = nnx.Param(jnp.full((num_heads,), float(gate_init)))
        if self.normalize_qk:
            scale = math.sqrt(head_dim) if init_scale is None else float(init_scale)
            self.log_scale = nnx.Param(jnp.full((num_heads,), math.log(scale)))
        device = None if mesh is None else batch_sharding(mesh, batch_axis)
        memory = state_mod.init(batch_size, num_heads, capacity, head_dim, head_dim, metric=metric,
                                score_dtype=score_dtype, device=device)
        self.memory = KNNMemory(memory)
        self.search_options = (("k", k), ("method", method), ("recall_target", float(recall_target)),
                               ("block_bytes", block_bytes))
        search_mod.check_options(method=method, recall_target=recall_target, block_bytes=block_bytes)
        zeros = functools.partial(jnp.zeros, device=device)
        self.xl = XLCache((zeros((batch_size, xl_len, num_heads, head_dim)),
                           zeros((batch_size, xl_len, num_heads, head_dim)),
                           zeros((batch_size, xl_len), bool))) if xl_len else None

    @property
    def batch_size(self) -> int:
        return self.memory.get_value().batch_size

    def reset_memory(self) -> None:
        """Forget every row of the memory and the XL cache."""
        state = self.memory.get_value()
        self.memory.set_value(state_mod.clear(state, jnp.ones(state.batch_size, bool)))
        if self.xl is not None:
            keys, values, valid = self.xl.get_value()
            self.xl.set_value((keys, values, jnp.zeros_like(valid)))

    def __call__(self, x: jax.Array, doc_start: jax.Array | None = None, *, update_memory: bool = True) -> jax.Array:
        """x [B, T, dim] -> [B, T, dim]; doc_start [B] bool flags rows whose document starts here.

        ``update_memory=False`` reads the memory without writing this segment to it.
        """
        B = self.batch_size
        if x.ndim != 3 or x.shape[0] != B or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch={B}, tokens, dim={self.dim}], got shape {tuple(x.shape)}")
        T, H, D = x.shape[1], self.num_heads, self.head_dim
        clear, search, add = memory_ops(self.mesh, self.batch_axis, self.search_options)
        state = self.memory.get_value()
        xl = None if self.xl is None else self.xl.get_value()
        if doc_start is not None:
            state = clear(state, doc_start)   # checks doc_start: a bool [B]
            if xl is not None:
                xl = (xl[0], xl[1], xl[2] & ~doc_start[:, None])

        q, k, v = (proj(x).reshape(B, T, H, D) for proj in (self.to_q, self.to_k, self.to_v))
        if self.normalize_qk:
            q, k = _l2_normalize(q), _l2_normalize(k)
            scale = jnp.exp(self.log_scale[...])
        else:
            scale = jnp.full((H,), D ** -0.5, x.dtype)
        res = search(state, q)
        out = memory_attention(q, k, v, res.keys, res.values, res.mask, self.gate_bias[...], scale, xl)

        if update_memory:
            state = add(state, k, v)
        self.memory.set_value(state)
        if xl is not None:
            X = self.xl_len
            keys, values = (jnp.concatenate([c, jax.lax.stop_gradient(n).astype(c.dtype)], 1)[:, -X:]
                            for c, n in ((xl[0], k), (xl[1], v)))
            valid = jnp.concatenate([xl[2], jnp.ones((B, T), bool)], 1)[:, -X:]
            xl = (keys, values, valid)
            if self.mesh is not None:  # stays split along the batch, as it was made (a jitted step's in == out)
                xl = jax.lax.with_sharding_constraint(xl, batch_sharding(self.mesh, self.batch_axis))
            self.xl.set_value(xl)
        return self.to_out(out.reshape(B, T, H * D))


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(|x|, eps) along the last axis (as torch.nn.functional.normalize)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def knn_layers(model: nnx.Module) -> list[KNNAttention]:
    """Every KNNAttention inside ``model`` (the model itself included)."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, KNNAttention)]


def reset_memories(model: nnx.Module) -> None:
    """Forget everything the KNNAttention layers of ``model`` hold (memories and XL caches)."""
    for layer in knn_layers(model):
        layer.reset_memory()
