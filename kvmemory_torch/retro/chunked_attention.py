"""Chunked cross-attention (CCA), RETRO's way for a decoder to read retrieved neighbours without seeing its future.

The decoder's sequence of n tokens is cut into chunks of ``chunk_len`` = m
tokens (the database's chunk length); chunk u covers positions [u m, u m + m).
Neighbours are retrieved for every *complete* chunk, from its own tokens, so
they may hold what follows the chunk: a token may only read the neighbours of
a chunk that is complete at its own position. RETRO's rule (Borgeaud et al.
2021, section 2.4): the sequence is shifted by m - 1, so the *attending chunk*
u is positions [u m + m - 1, u m + 2 m - 1): the last token of chunk u and the
first m - 1 tokens of chunk u + 1 attend to the neighbours of chunk u. Token j
reads chunk ``(j + 1) // m - 1``, the latest chunk that has ended at or
before j (see :func:`attending_chunk`); the first m - 1 tokens read nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from .cross_attention import CrossAttention


def attending_chunk(n: int, chunk_len: int, device=None) -> torch.Tensor:
    """[n] int64: the chunk whose neighbours token j reads, ``(j + 1) // chunk_len - 1`` (-1: none)."""
    return (torch.arange(n, device=device) + 1) // chunk_len - 1


class ChunkedCrossAttention(nn.Module):
    """RETRO's CCA: each token attends to the encoded neighbours of the chunk it may read (module docstring).

    Input the residual stream h [B, n, dim] (normalised here) and the encoded
    neighbours [B, L, k, r, encoder_dim] of the sequence's L = n // m complete
    chunks, with their mask [B, L, k, r] bool (False on padding and on missing
    neighbours). Returns the residual update [B, n, dim]: zero on the first
    m - 1 tokens and on tokens whose chunk has no neighbour token.

    Queries attend to all k neighbours of their chunk at once (k r keys).
    Positions are relative (rotary): a token at offset p from the start of
    chunk u sits at position p, the neighbour tokens at 0, ..., r - 1 (the
    neighbour chunk, then its continuation), so "the neighbour token aligned
    with the one I predict" is one fixed offset.
    """

    def __init__(self, dim: int, encoder_dim: int, num_heads: int, head_dim: int, chunk_len: int,
                 normalize_qk: bool = True, rotary: bool = True):
        super().__init__()
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
        self.chunk_len = chunk_len
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, encoder_dim, num_heads, head_dim, normalize_qk=normalize_qk,
                                        rotary=rotary)

    def forward(self, h: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, n, dim = h.shape
        m = self.chunk_len
        L = n // m
        if encoded.dim() != 5 or tuple(encoded.shape[:2]) != (B, L) or encoded.shape[-1] != self.attention.context_dim:
            raise ValueError(f"encoded neighbours must be [batch={B}, chunks={L} (= tokens {n} // chunk_len {m}), "
                             f"k, neighbour_len, {self.attention.context_dim}], got {tuple(encoded.shape)}")
        if tuple(mask.shape) != tuple(encoded.shape[:4]) or mask.dtype != torch.bool:
            raise ValueError(f"neighbour mask must be a bool tensor {tuple(encoded.shape[:4])}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        out = h.new_zeros(B, n, dim)
        if L == 0:
            return out
        k, r = encoded.shape[2:4]
        q = self.norm(h)[:, m - 1:m - 1 + L * m]                       # attending chunks, the last one cut at n
        if q.shape[1] < L * m:
            q = torch.cat([q, q.new_zeros(B, L * m - q.shape[1], dim)], 1)
        q = q.reshape(B * L, m, dim)
        context = encoded.reshape(B * L, k * r, encoded.shape[-1])
        positions = torch.arange(r, device=h.device).repeat(k)
        y = self.attention(q, context, mask.reshape(B * L, k * r), q_start=m - 1, k_positions=positions)
        y = y.reshape(B, L * m, dim)[:, :n - m + 1]
        return torch.cat([out[:, :m - 1], y], 1)
