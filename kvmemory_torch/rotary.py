"""Rotary position embedding (RoPE, Su et al. 2021) for the local attention of a segment and its XL cache."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, start: int = 0, base: float = 10000.0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, T, H, D] rotated as if its tokens sat at positions start, ..., start + T - 1 (or at ``positions`` [T]).

    Pairs (x[..., i], x[..., i + D/2]) turn by angle position * base^(-2i/D), so
    the dot product of a rotated query and a rotated key depends on their
    positions only through their difference. D must be even. Norms are kept.
    """
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {D}")
    half = D // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)     # [D/2]
    if positions is None:
        positions = torch.arange(start, start + T, device=x.device)
    angle = positions.to(device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos()[:, None].to(x.dtype), angle.sin()[:, None].to(x.dtype)      # [T,1,D/2]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
