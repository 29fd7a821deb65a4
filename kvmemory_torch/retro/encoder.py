"""The neighbour encoder: a small bidirectional transformer over each retrieved neighbour and its continuation."""

from __future__ import annotations

import torch
from torch import nn

from ..blocks import Block
from ..local_attention import LocalAttention
from .cross_attention import CrossAttention


class NeighbourEncoder(nn.Module):
    """RETRO's encoder: each neighbour (chunk + continuation, r tokens) is encoded on its own, bidirectionally,
    conditioned on the decoder's states of the chunk it was retrieved for.

    Every layer is a pre-norm :class:`kvmemory_torch.blocks.Block` whose
    attention is a bidirectional :class:`LocalAttention` (rotary positions,
    padding masked), with a cross-attention to the decoder chunk's states
    (the chunk's m tokens, as the decoder computed them up to its first RETRO
    layer) between the attention and the MLP.

    Args:
        dim: the encoder's width. input_dim: width of the token embeddings given
            to ``forward`` (a projection is added when it differs from dim).
        context_dim: the decoder's width. depth, num_heads: encoder sizes.
    """

    def __init__(self, dim: int, input_dim: int, context_dim: int, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"encoder dim={dim} must be divisible by encoder num_heads={num_heads}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"encoder depth must be an int >= 1, got {depth!r}")
        head_dim = dim // num_heads
        self.dim, self.context_dim = dim, context_dim
        self.proj_in = nn.Linear(input_dim, dim) if input_dim != dim else nn.Identity()
        self.context_norm = nn.LayerNorm(context_dim)
        self.blocks = nn.ModuleList(
            Block(dim, LocalAttention(dim, num_heads, head_dim, causal=False, rotary=True), mlp_ratio)
            for _ in range(depth))
        self.cross_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.cross = nn.ModuleList(CrossAttention(dim, context_dim, num_heads, head_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def residual_outputs(self) -> list:
        """The projections writing into the encoder's residual stream (scaled at initialisation)."""
        return [out for b, c in zip(self.blocks, self.cross) for out in (b.attention.to_out, b.mlp[2], c.to_out)]

    def forward(self, embedded: torch.Tensor, mask: torch.Tensor, chunk_states: torch.Tensor) -> torch.Tensor:
        """embedded [B, L, k, r, input_dim], mask [B, L, k, r] bool, chunk_states [B, L, m, context_dim]
        -> encoded neighbours [B, L, k, r, dim]."""
        B, L, k, r, _ = embedded.shape
        m = chunk_states.shape[2]
        x = self.proj_in(embedded).reshape(B * L * k, r, self.dim)
        key_mask = mask.reshape(B * L * k, r)
        context = self.context_norm(chunk_states)[:, :, None].expand(B, L, k, m, self.context_dim)
        context = context.reshape(B * L * k, m, self.context_dim)
        for block, norm, cross in zip(self.blocks, self.cross_norms, self.cross):
            x = block.attend(x, key_mask=key_mask)
            x = x + cross(norm(x), context)
            x = block.feed_forward(x)
        return self.norm(x).reshape(B, L, k, r, self.dim)
