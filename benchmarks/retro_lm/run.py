"""Models, training with equal budgets, and held-out bits/byte (per chunk, so leaky chunks can be left out)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from kvmemory.atomic import atomic_open
from kvmemory_torch.retro import RetroTransformer, precomputed_neighbours

from ..common import log
from ..training import adamw, warmup_cosine
from .data import EvalSet, TrainBatches
from .presets import Preset

VOCAB = 256
LN2 = math.log(2)


def build_model(preset: Preset, retrieval: bool) -> RetroTransformer:
    torch.manual_seed(preset.seed)
    return RetroTransformer(VOCAB, dim=preset.dim, depth=preset.depth, num_heads=preset.heads,
                            chunk_len=preset.chunk_len, retro_layers=preset.retro_layers,
                            encoder_dim=preset.encoder_dim, encoder_depth=preset.encoder_depth,
                            retrieval=retrieval).to(preset.device)


def retrofit(preset: Preset, model: RetroTransformer) -> list:
    """Add CCA and the encoder to a trained plain decoder (base frozen); returns the new parameters."""
    torch.manual_seed(preset.seed + 1)
    return model.add_retrieval(retro_layers=preset.retro_layers, encoder_dim=preset.encoder_dim,
                               encoder_depth=preset.encoder_depth)


def train(preset: Preset, model: RetroTransformer, batches: TrainBatches, steps: int, params=None,
          name: str = "", ckpt: str | None = None) -> dict:
    """``steps`` AdamW steps on ``params`` (default: all trainable); the weights are cached at ``ckpt``."""
    if ckpt and os.path.exists(ckpt):
        state = torch.load(ckpt, map_location=preset.device, weights_only=False)
        if state["key"] == preset.key():
            model.load_state_dict(state["model"])
            log(f"[{name}] loaded {ckpt}")
            return state["summary"]
    params = list(model.parameters()) if params is None else list(params)
    opt = adamw(params, preset.lr)
    sched = warmup_cosine(opt, steps, min(preset.warmup, max(1, steps // 5)))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        inputs, targets, nb, mask = batches.next()
        logits = model(inputs, nb, mask) if model.has_retrieval else model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item() / LN2)
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"[{name}] step {step + 1}/{steps}: {np.mean(losses[-20:]):.3f} bits/byte (train), "
                f"{(time.perf_counter() - t0) / (step + 1):.2f} s/step")
    summary = {"steps": steps, "train_s": time.perf_counter() - t0,
               "final_train_bits": float(np.mean(losses[-max(1, steps // 10):])) if losses else None,
               "trainable_params": sum(p.numel() for p in params if p.requires_grad)}
    if ckpt:
        os.makedirs(os.path.dirname(ckpt), exist_ok=True)
        with atomic_open(ckpt) as f:
            torch.save({"key": preset.key(), "model": model.state_dict(), "summary": summary}, f)
    return summary


@torch.no_grad()
def chunk_bits(preset: Preset, model: RetroTransformer, ev: EvalSet, retrieval: bool = True) -> np.ndarray:
    """[W, L] summed bits of each chunk's m targets; ``retrieval=False`` masks every neighbour out."""
    model.eval()
    out = np.zeros((len(ev), preset.seq_chunks))
    for a in range(0, len(ev), preset.eval_batch):
        sl = slice(a, a + preset.eval_batch)
        inputs = torch.as_tensor(ev.inputs[sl].astype(np.int64), device=preset.device)
        targets = torch.as_tensor(ev.targets[sl].astype(np.int64), device=preset.device)
        if model.has_retrieval:
            nb, mask = precomputed_neighbours(ev.db, ev.neighbour_ids[sl], device=preset.device)
            logits = model(inputs, nb, mask if retrieval else torch.zeros_like(mask))
        else:
            logits = model(inputs)
        nats = F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1), reduction="none")
        bits = (nats / LN2).view(len(inputs), preset.seq_chunks, preset.chunk_len).sum(-1)
        out[sl] = bits.cpu().numpy()
    return out


def bits_per_byte(preset: Preset, bits: np.ndarray, keep: np.ndarray | None = None) -> float | None:
    if keep is not None:
        bits = bits[keep]
    return float(bits.sum() / (bits.size * preset.chunk_len)) if bits.size else None
