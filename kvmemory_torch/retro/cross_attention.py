"""CrossAttention: queries from one sequence attend to the tokens of another (a context), with a key mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvmemory.validation import check_int_option

from .. import rotary as rope


class CrossAttention(nn.Module):
    """Multi-head attention of x [N, Tq, dim] over a context [N, Tk, context_dim]; no causal mask.

    The conventions of :class:`kvmemory_torch.LocalAttention`: L2-normalised
    queries and keys with a learned per-head logit scale (``normalize_qk``),
    optional rotary positions. With ``rotary`` the caller gives the positions
    of the queries and of the keys (``q_start``, ``k_positions``), so a query
    can attend by relative offset (RETRO's relative positions in CCA).

    ``mask`` [N, Tk] bool: True on real context tokens. A query whose context
    has none gets a zero output (so does its gradient), not NaN.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int, normalize_qk: bool = True,
                 rotary: bool = False, bias: bool = False):
        super().__init__()
        dim, context_dim, num_heads, head_dim = (
            check_int_option(name, value) for name, value in
            (("dim", dim), ("context_dim", context_dim), ("num_heads", num_heads), ("head_dim", head_dim)))
        if rotary and head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
        self.dim, self.context_dim, self.num_heads, self.head_dim = dim, context_dim, num_heads, head_dim
        self.normalize_qk, self.rotary = normalize_qk, rotary
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)
        if normalize_qk:
            self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(math.sqrt(head_dim))))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None,
                q_start: int = 0, k_positions: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, Tq, dim], context [N, Tk, context_dim], mask [N, Tk] bool -> [N, Tq, dim].

        With ``rotary``: queries sit at positions q_start, ..., q_start + Tq - 1,
        keys at ``k_positions`` [Tk] (default 0, ..., Tk - 1).
        """
        N, Tq, _ = x.shape
        Tk = context.shape[1]
        H, D = self.num_heads, self.head_dim
        q = self.to_q(x).view(N, Tq, H, D)
        k = self.to_k(context).view(N, Tk, H, D)
        v = self.to_v(context).view(N, Tk, H, D)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            q = q * self.log_scale.exp()[:, None]
        else:
            q = q * D ** -0.5
        if self.rotary:
            q = rope.rotate(q, start=q_start)
            k = rope.rotate(k, positions=k_positions)
        attn_mask = None
        if mask is not None:
            has_key = mask.any(-1)                                              # [N]
            attn_mask = (mask | ~has_key[:, None])[:, None, None, :]           # keyless rows: uniform, then zeroed
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attn_mask, scale=1.0).transpose(1, 2)
        out = self.to_out(out.reshape(N, Tq, H * D))
        if mask is not None:
            out = out * has_key[:, None, None].to(out.dtype)
        return out
