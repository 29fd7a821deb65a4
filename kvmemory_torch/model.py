"""A small decoder-only language model with one KNNAttention layer (Memorizing Transformer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KNNAttention


class CausalSelfAttention(nn.Module):
    """Plain multi-head causal self-attention over the segment: [B, T, dim] -> [B, T, dim]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=False)
        self.to_out = nn.Linear(num_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, doc_start=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.to_qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # [B,H,T,D]
        return self.to_out(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, doc_start=None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), doc_start)
        return x + self.mlp(self.norm2(x))


class MemorizingTransformer(nn.Module):
    """Token embedding, ``depth`` pre-norm blocks, final norm and output head.

    Block ``knn_layer`` (default ``depth - 2``, near the top as in the paper)
    uses :class:`KNNAttention`; the others plain causal attention. Positions
    are learned embeddings of the position inside the segment (at most
    ``max_len`` tokens); the memory carries what lies before the segment.

    Args:
        vocab_size, dim, depth, num_heads: model sizes (head_dim = dim // num_heads).
        memory: a ``kvmemory.Memory`` or a dict of its arguments (see KNNAttention).
        k: neighbours per query. tie_embeddings: output head shares the embedding.
        **knn_options: passed to KNNAttention (normalize_qk, xl_cache, gate_init, ...).
    """

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 6, num_heads: int = 4,
                 memory=None, k: int = 32, knn_layer: int | None = None, max_len: int = 2048,
                 tie_embeddings: bool = True, mlp_ratio: int = 4, **knn_options):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        head_dim = dim // num_heads
        self.knn_layer = max(depth - 2, 0) if knn_layer is None else knn_layer
        if not 0 <= self.knn_layer < depth:
            raise ValueError(f"knn_layer must be in [0, {depth}), got {knn_layer}")
        memory = {"capacity": 8192} if memory is None else memory
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            Block(dim, KNNAttention(dim, num_heads, head_dim, memory, k=k, **knn_options)
                  if i == self.knn_layer else CausalSelfAttention(dim, num_heads, head_dim), mlp_ratio)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def knn_attention(self) -> KNNAttention:
        return self.blocks[self.knn_layer].attention

    def forward(self, tokens: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab_size]; doc_start [B] bool (see KNNAttention)."""
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be [batch, tokens <= {self.max_len}], got {tuple(tokens.shape)}")
        x = self.embed(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x, doc_start)
        return self.head(self.norm(x))
