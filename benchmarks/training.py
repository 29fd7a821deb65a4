"""The optimiser and learning-rate schedule shared by the experiments (lm_memory, retro_lm)."""

from __future__ import annotations

import math

import torch


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98) with weight decay 0.1 on matrices only; frozen parameters left out."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def warmup_cosine(optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of the peak at step ``steps``."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
