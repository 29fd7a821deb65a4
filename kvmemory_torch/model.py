"""A small decoder-only language model with one KNNAttention layer (Memorizing Transformer)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import KNNAttention
from .blocks import Block, init_weights
from .local_attention import LocalAttention

__all__ = ["Block", "MemorizingTransformer"]


class MemorizingTransformer(nn.Module):
    """Token embedding, ``depth`` pre-norm blocks, final norm and output head.

    Every block attends causally over the segment with :class:`LocalAttention`
    (normalised q/k with a learned per-head scale, rotary positions, and with
    ``xl_cache=True`` the previous segment too). With a ``memory``, block
    ``knn_layer`` (default ``depth - 2``, near the top as in the paper) is a
    :class:`KNNAttention` instead; with ``memory=None`` the model is the same
    minus the memory: the baseline, which :meth:`add_memory` turns into the
    memory model keeping every trained weight (the paper's retrofitting).
    Block ``knn_layer`` never has rotary positions, memory or not: the
    memory keeps keys without positions, so a query must match a key the
    same way in the segment and in the memory (rotary q.k mixes content and
    distance, and a match learnt locally would not carry over).

    Feed a document segment by segment, passing ``doc_start`` [B] bool for the
    rows whose document starts with this segment; :func:`reset_memories`
    forgets every memory and cache.

    Args:
        vocab_size, dim, depth, num_heads: model sizes (head_dim = dim // num_heads).
        memory: a ``kvmemory.Memory``, a dict of its arguments (see KNNAttention), or None.
        k: neighbours per query. gate_init: initial memory gate bias (see KNNAttention).
        knn_layer: the block that gets the memory.
        tie_embeddings: the output head shares the embedding matrix.
        init_std: standard deviation of the initial linear and embedding
            weights (residual output projections get init_std / sqrt(2 depth)).
        **attention_options: LocalAttention options for every block
            (normalize_qk, init_scale, xl_cache, rotary (default True here), bias).
    """

    def __init__(self, vocab_size: int, dim: int = 256, depth: int = 6, num_heads: int = 4,
                 memory=None, k: int = 32, knn_layer: int | None = None, gate_init: float = 0.0,
                 tie_embeddings: bool = True, mlp_ratio: int = 4, init_std: float = 0.02, **attention_options):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.head_dim = dim // num_heads
        self.knn_layer = max(depth - 2, 0) if knn_layer is None else knn_layer
        if not 0 <= self.knn_layer < depth:
            raise ValueError(f"knn_layer must be in [0, {depth}), got {knn_layer}")
        self.attention_options = {"rotary": True, **attention_options}
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, LocalAttention(dim, num_heads, self.head_dim, **self._options(i)), mlp_ratio)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self._init_weights(init_std, depth)
        if memory is not None:
            self.add_memory(memory, k=k, gate_init=gate_init)

    def _options(self, block: int) -> dict:
        """Block ``knn_layer`` has no rotary embedding, memory or not: its q.k must mean the same for the
        segment and for the memory, which carries no positions (the paper's memory layer has none either)."""
        return {**self.attention_options, "rotary": False} if block == self.knn_layer else self.attention_options

    def _init_weights(self, std: float, depth: int) -> None:
        init_weights(self, std, depth, [out for b in self.blocks for out in (b.attention.to_out, b.mlp[2])])

    @property
    def knn_attention(self) -> KNNAttention | None:
        """The memory layer, or None for a model without memory."""
        attention = self.blocks[self.knn_layer].attention
        return attention if isinstance(attention, KNNAttention) else None

    def add_memory(self, memory, k: int = 32, gate_init: float = 0.0) -> KNNAttention:
        """Give block ``knn_layer`` a memory, keeping its trained attention weights; returns the new layer.

        The KNNAttention starts from the plain layer's projections and scales
        (same parameter names), with a fresh gate ``sigmoid(gate_init)``: a
        negative ``gate_init`` starts the retrofitted model close to the
        model it was. Build the optimizer after this call (the gate is new).
        """
        if self.knn_attention is not None:
            raise ValueError(f"block {self.knn_layer} has a memory already")
        old = self.blocks[self.knn_layer].attention
        new = KNNAttention(old.dim, old.num_heads, old.head_dim, memory, k=k, gate_init=gate_init,
                           **self._options(self.knn_layer))
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        if unexpected or missing != ["gate_bias"]:
            raise AssertionError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
        self.blocks[self.knn_layer].attention = new.to(next(old.parameters()).device)
        return new

    def forward(self, tokens: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] int64 -> logits [B, T, vocab_size]; doc_start [B] bool (see KNNAttention)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, tokens], got shape {tuple(tokens.shape)}")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, doc_start)
        return self.head(self.norm(x))
