"""Drive any kvmemory.Memory with torch tensors.

With ``backend="torch"`` tensors go straight to the memory (no transfer; the
memory must live on the tensors' device). With a host backend (exact, faiss,
scann, hnsw) each call moves its inputs to the host in one ``.cpu()`` and,
for a search, brings the whole result back in one transfer: keys, values,
scores and ids are packed into a single byte buffer, copied once, and viewed
apart on the device (the mask is rebuilt there as ``ids >= 0``).
"""

from __future__ import annotations

import numpy as np
import torch

from kvmemory import Memory, SearchResult


def is_device_memory(memory: Memory) -> bool:
    """True when the memory stores torch tensors (backend="torch")."""
    return hasattr(memory.backend, "clear_mask_tensor")


def memory_device(memory: Memory) -> torch.device | None:
    """The device of a torch-backed memory, None for a host memory."""
    return memory.backend.device if is_device_memory(memory) else None


def _to_host(x: torch.Tensor) -> np.ndarray:
    """A detached float32 numpy copy of x, made with one device-to-host copy."""
    return x.detach().to(torch.float32).cpu().numpy()


def add(memory: Memory, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append keys [B,T,H,Dk] and values [B,T,H,Dv] (detached; no gradient reaches the memory)."""
    if is_device_memory(memory):
        memory.add(keys.detach(), values.detach())
        return
    dk = keys.shape[-1]
    both = _to_host(torch.cat([keys.detach().to(torch.float32), values.detach().to(torch.float32)], -1))
    memory.add(both[..., :dk], both[..., dk:])


def search(memory: Memory, queries: torch.Tensor, k: int, with_entries: bool = True) -> SearchResult:
    """Top-k of queries [B,T,H,Dk] as a SearchResult of tensors on ``queries.device``."""
    if is_device_memory(memory):
        return memory.search(queries.detach(), k, with_entries=with_entries)
    res = memory.search(_to_host(queries), k, with_entries=with_entries)
    return result_to_device(res, queries.device)


def clear(memory: Memory, rows: torch.Tensor) -> None:
    """Forget the rows flagged in the bool tensor ``rows`` [B]; no host sync for a torch memory on its device."""
    memory.clear(rows.detach())


def result_to_device(res: SearchResult, device: torch.device) -> SearchResult:
    """A numpy SearchResult as tensors on ``device``, with one host-to-device copy."""
    parts = [np.ascontiguousarray(a) for a in (res.keys, res.values, res.scores, res.ids) if a is not None]
    offsets, total = [], 0
    for a in parts:
        total += -total % 8  # keep every part 8-byte aligned so it can be viewed as its dtype
        offsets.append(total)
        total += a.nbytes
    pinned = torch.device(device).type == "cuda"
    host = torch.empty(total, dtype=torch.uint8, pin_memory=pinned)
    host_np = host.numpy()
    for a, off in zip(parts, offsets):
        host_np[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
    flat = host.to(device, non_blocking=pinned)
    out = []
    for a, off in zip(parts, offsets):
        dtype = torch.int64 if a.dtype == np.int64 else torch.float32
        out.append(flat[off:off + a.nbytes].view(dtype).view(a.shape))
    if res.keys is None:
        out = [None, None] + out
    keys, values, scores, ids = out
    return SearchResult(keys=keys, values=values, scores=scores, ids=ids, mask=ids >= 0)
