"""Held-out bits/byte over whole documents, streamed with memory, overall and by position in the document."""

from __future__ import annotations

import time

import numpy as np
import torch

from kvmemory_torch import reset_memories

from .stream import EvalStream
from .train import probe, token_bits

# position buckets (bytes into the document): [0, 256), [256, 512), ..., [65536, inf)
POSITION_EDGES = (0, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@torch.no_grad()
def evaluate(model, docs, batch_size: int, seg_len: int, device: str, recall: bool = False) -> dict:
    """Bits per byte of ``docs``, each read whole, segment by segment, its memory filling as it goes.

    Returns bits/byte overall, by position bucket (:data:`POSITION_EDGES`),
    on far copies (``copied_``), near copies and elsewhere (copy-task
    documents: see :mod:`.copy_task`) and on far copies by offset in the copy
    (``copied_by_offset``: the first bytes locate a copy, the rest can be
    read from it), the bytes counted,
    and with ``recall`` (approximate backends) recall@k of the memory's
    searches against an exact memory of the same entries.
    """
    mem = probe(model)
    if mem is not None:
        if recall:
            mem.measure_recall()
        mem.reset_counters()
    reset_memories(model)
    model.eval()
    edges = np.asarray(POSITION_EDGES)
    bucket_bits = np.zeros(len(edges))
    bucket_n = np.zeros(len(edges), np.int64)
    kinds = {"far": 0, "near": -2, "other": -1}          # copy_offset: >= 0 in far copies
    kind_bits = dict.fromkeys(kinds, 0.0)
    kind_n = dict.fromkeys(kinds, 0)
    offset_bits, offset_n = np.zeros(0), np.zeros(0, np.int64)
    t0 = time.perf_counter()
    stream = EvalStream(docs, batch_size, seg_len)
    for batch in stream:
        bits, valid = token_bits(model, batch, device)
        bits, valid = bits.cpu().numpy().astype(np.float64), valid.cpu().numpy()
        bucket = np.searchsorted(edges, batch.position, side="right") - 1
        np.add.at(bucket_bits, bucket[valid], bits[valid])
        np.add.at(bucket_n, bucket[valid], 1)
        for kind, code in kinds.items():
            sel = valid & ((batch.copy_offset >= 0) if kind == "far" else (batch.copy_offset == code))
            kind_bits[kind] += bits[sel].sum()
            kind_n[kind] += int(sel.sum())
        far = valid & (batch.copy_offset >= 0)
        if far.any():
            offsets = batch.copy_offset[far].astype(np.int64)
            if offsets.max() >= len(offset_bits):
                grow = offsets.max() + 1 - len(offset_bits)
                offset_bits, offset_n = np.pad(offset_bits, (0, grow)), np.pad(offset_n, (0, grow))
            np.add.at(offset_bits, offsets, bits[far])
            np.add.at(offset_n, offsets, 1)
    seconds = time.perf_counter() - t0
    model.train()
    n = int(bucket_n.sum())
    result = {
        "bits_per_byte": float(bucket_bits.sum() / n),
        "bytes": n, "documents": len(docs), "seconds": seconds,
        "by_position": [{"from": int(lo), "to": int(hi) if hi is not None else None,
                         "bits_per_byte": float(b / c) if c else None, "bytes": int(c)}
                        for lo, hi, b, c in zip(edges, [*edges[1:], None], bucket_bits, bucket_n)],
        "copied_bytes": kind_n["far"],
        "copied_by_offset": [float(b / c) if c else None for b, c in zip(offset_bits, offset_n)],
    }
    for kind, key in (("far", "copied"), ("near", "near_copied"), ("other", "other")):
        result[f"{key}_bits_per_byte"] = kind_bits[kind] / kind_n[kind] if kind_n[kind] else None
    if mem is not None:
        result["memory_s"] = sum(mem.seconds.values())
        result["recall_at_k"] = mem.recall
        mem.shadow = None
    return result
