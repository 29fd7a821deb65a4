"""Chunked cross-attention (CCA), RETRO's way for a decoder to read retrieved neighbours without seeing its future.

The decoder's sequence of n tokens is cut into chunks of ``chunk_len`` = m
tokens (the database's chunk length); chunk u covers positions [u m, u m + m).
Neighbours are retrieved for every *complete* chunk, from its own tokens, and
their continuations may hold what follows the chunk, so a token may only read
the neighbours of a chunk that is complete at its own position.

Two placements of the *attending chunk* (the tokens that read chunk u's
neighbours) are offered:

* ``retro_shift=False`` (default): chunk u + 1, positions [u m + m, u m + 2 m),
  reads the neighbours of chunk u; the first chunk reads nothing. Token j
  reads chunk ``j // m - 1``.
* ``retro_shift=True``: the paper's placement (Borgeaud et al. 2021, section
  2.4), shifted by m - 1: positions [u m + m - 1, u m + 2 m - 1), so the last
  token of chunk u, which completes it, already reads its neighbours (it
  predicts the first token of chunk u + 1). Token j reads chunk
  ``(j + 1) // m - 1``; the first m - 1 tokens read nothing.

Both are causal: the neighbours a token reads were chosen from tokens at or
before its own position, so changing a later chunk's neighbours (or tokens)
changes no earlier output. See :func:`attending_chunk`.
"""

from __future__ import annotations

import torch
from torch import nn

from .cross_attention import CrossAttention


def first_reader(chunk_len: int, retro_shift: bool = False) -> int:
    """The first position that reads any neighbours (those of chunk 0): m, or m - 1 with ``retro_shift``."""
    return chunk_len - 1 if retro_shift else chunk_len


def attending_chunk(n: int, chunk_len: int, retro_shift: bool = False, device=None) -> torch.Tensor:
    """[n] int64: the chunk whose neighbours token j reads (-1: none); see the module docstring."""
    start = first_reader(chunk_len, retro_shift)
    return (torch.arange(n, device=device) + chunk_len - start) // chunk_len - 1


class ChunkedCrossAttention(nn.Module):
    """RETRO's CCA: each token attends to the encoded neighbours of the chunk it may read (module docstring).

    Input the residual stream h [B, n, dim] (normalised here) and the encoded
    neighbours [B, L, k, r, encoder_dim] of the sequence's L = n // m complete
    chunks, with their mask [B, L, k, r] bool (False on padding and on missing
    neighbours). Returns the residual update [B, n, dim]: zero on the tokens
    before :func:`first_reader` and on tokens whose chunk has no neighbour token.

    Queries attend to all k neighbours of their chunk at once (k r keys).
    Positions are relative (rotary), in the frame of the chunk u whose
    neighbours are read: a token at position u m + p sits at p (m <= p < 2 m
    by default, so it lines up with the continuation), the neighbour tokens at
    0, ..., r - 1 (the neighbour chunk, then its continuation).
    """

    def __init__(self, dim: int, encoder_dim: int, num_heads: int, head_dim: int, chunk_len: int,
                 normalize_qk: bool = True, rotary: bool = True, retro_shift: bool = False):
        super().__init__()
        if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"chunk_len must be an int >= 1, got {chunk_len!r}")
        self.chunk_len, self.retro_shift = chunk_len, bool(retro_shift)
        self.start = first_reader(chunk_len, retro_shift)
        self.norm = nn.LayerNorm(dim)
        self.attention = CrossAttention(dim, encoder_dim, num_heads, head_dim, normalize_qk=normalize_qk,
                                        rotary=rotary)

    def forward(self, h: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(h, torch.Tensor) or h.dim() != 3 or h.shape[-1] != self.attention.dim:
            raise ValueError(f"h must be a tensor [batch, tokens, {self.attention.dim}], "
                             f"got {tuple(getattr(h, 'shape', ()))}")
        B, n, dim = h.shape
        m, start = self.chunk_len, self.start
        L = n // m
        if not isinstance(encoded, torch.Tensor) or encoded.dim() != 5 or tuple(encoded.shape[:2]) != (B, L) \
                or encoded.shape[-1] != self.attention.context_dim:
            raise ValueError(f"encoded neighbours must be [batch={B}, chunks={L} (= tokens {n} // chunk_len {m}), "
                             f"k, neighbour_len, {self.attention.context_dim}], got "
                             f"{tuple(getattr(encoded, 'shape', ()))}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(encoded.shape[:4]) \
                or mask.dtype != torch.bool:
            raise ValueError(f"neighbour mask must be a bool tensor {tuple(encoded.shape[:4])}, "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        out = h.new_zeros(B, n, dim)
        readers = n - start                                            # tokens that read some chunk's neighbours
        if L == 0 or readers <= 0:
            return out
        k, r = encoded.shape[2:4]
        q = self.norm(h)[:, start:start + L * m]                       # the attending chunks, the last cut at n
        if q.shape[1] < L * m:
            q = torch.cat([q, q.new_zeros(B, L * m - q.shape[1], dim)], 1)
        q = q.reshape(B * L, m, dim)
        context = encoded.reshape(B * L, k * r, encoded.shape[-1])
        positions = torch.arange(r, device=h.device).repeat(k)
        y = self.attention(q, context, mask.reshape(B * L, k * r), q_start=start, k_positions=positions)
        y = y.reshape(B, L * m, dim)[:, :readers]
        return torch.cat([out[:, :start], y], 1)
