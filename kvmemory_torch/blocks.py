"""The pre-norm transformer block and GPT-2 initialisation shared by the reference decoders."""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x)).

    ``attend`` and ``feed_forward`` are the two residual steps, so a model can
    run something in between (RETRO's chunked cross-attention).
    """

    def __init__(self, dim: int, attention: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), attention
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def attend(self, x: torch.Tensor, doc_start=None, **options) -> torch.Tensor:
        """x + attention(norm1(x)); ``options`` go to the attention (e.g. key_mask)."""
        return x + self.attention(self.norm1(x), doc_start, **options)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + mlp(norm2(x))."""
        return x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, doc_start=None) -> torch.Tensor:
        return self.feed_forward(self.attend(x, doc_start))


def init_weights(module: nn.Module, std: float, depth: int, residual_outputs=()) -> None:
    """GPT-2 initialisation: every Linear and Embedding weight N(0, std), biases 0; the Linear layers in
    ``residual_outputs`` (the projections that write into the residual stream) N(0, std / sqrt(2 depth))."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for out in residual_outputs:
        nn.init.normal_(out.weight, std=std / math.sqrt(2 * depth))
