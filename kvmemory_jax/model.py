"""A small decoder-only language model with one KNNAttention layer (Memorizing Transformer), in Flax NNX.

The JAX twin of ``kvmemory_torch.MemorizingTransformer``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import causal_attention
from .layer import KNNAttention


class CausalSelfAttention(nnx.Module):
    """Plain multi-head causal self-attention over the segment: [B, T, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_qkv = nnx.Linear(dim, 3 * num_heads * head_dim, use_bias=False, rngs=rngs)
        self.to_out = nnx.Linear(num_heads * head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, doc_start=None, **_) -> jax.Array:
        B, T, _ = x.shape
        q, k, v = jnp.moveaxis(self.to_qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim), 2, 0)
        out = causal_attention(q * self.head_dim ** -0.5, k, v)                     # [B,T,H,D]
        return self.to_out(out.reshape(B, T, -1))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, attention: nnx.Module, mlp_ratio: int = 4, *, rngs: nnx.Rngs):
        self.norm1, self.attention = nnx.LayerNorm(dim, rngs=rngs), attention
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
        self.down = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, doc_start=None, **kwargs) -> jax.Array:
        x = x + self.attention(self.norm1(x), doc_start, **kwargs)
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x)), approximate=False))


class MemorizingTransformer(nnx.Module):
    """Token embedding, ``depth`` pre-norm blocks, final norm and output head.

    Block ``knn_layer`` (default ``depth - 2``, near the top as in the paper)
    uses :class:`~kvmemory_jax.layer.KNNAttention`; the others plain causal
    attention. Positions are learned embeddings of the position inside the
    segment (at most ``max_len`` tokens); the memory carries what lies before it.

    Args:
        vocab_size, dim, depth, num_heads: model sizes (head_dim = dim // num_heads).
        batch_size, capacity: of the memory (each batch row owns one memory row).
        k: neighbours per query. tie_embeddings: output head shares the embedding.
        rngs: ``nnx.Rngs`` for the initial parameters.
        **knn_options: passed to KNNAttention (normalize_qk, xl_len, gate_init, method, mesh, ...).
    """

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 6, num_heads: int = 4, *, batch_size: int,
                 capacity: int = 8192, k: int = 32, knn_layer: int | None = None, max_len: int = 2048,
                 tie_embeddings: bool = True, mlp_ratio: int = 4, rngs: nnx.Rngs, **knn_options):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        head_dim = dim // num_heads
        self.knn_layer = max(depth - 2, 0) if knn_layer is None else knn_layer
        if not 0 <= self.knn_layer < depth:
            raise ValueError(f"knn_layer must be in [0, {depth}), got {knn_layer}")
        self.max_len, self.tie_embeddings = max_len, tie_embeddings
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.position = nnx.Embed(max_len, dim, rngs=rngs)
        self.blocks = nnx.List([
            Block(dim, KNNAttention(dim, num_heads, head_dim, batch_size=batch_size, capacity=capacity, k=k,
                                    rngs=rngs, **knn_options)
                  if i == self.knn_layer else CausalSelfAttention(dim, num_heads, head_dim, rngs=rngs),
                  mlp_ratio, rngs=rngs)
            for i in range(depth)
        ])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = None if tie_embeddings else nnx.Linear(dim, vocab_size, use_bias=False, rngs=rngs)

    @property
    def knn_attention(self) -> KNNAttention:
        return self.blocks[self.knn_layer].attention

    def __call__(self, tokens: jax.Array, doc_start: jax.Array | None = None, *,
                 update_memory: bool = True) -> jax.Array:
        """tokens [B, T] int -> logits [B, T, vocab_size]; doc_start [B] bool (see KNNAttention)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [batch, tokens <= {self.max_len}], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x, doc_start, update_memory=update_memory)
        x = self.norm(x)
        return self.embed.attend(x) if self.head is None else self.head(x)
