"""KNNAttention: the kNN-augmented attention layer of Memorizing Transformers (Wu et al., 2022)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from kvmemory import Memory
from kvmemory.validation import check_int_option

from . import bridge
from .backend import resolve_device


class KNNAttention(nn.Module):
    """Causal self-attention over the segment plus attention over k neighbours from a memory.

    Per segment (the paper's order): rows flagged by ``doc_start`` are cleared
    (memory and XL cache), every query retrieves its top-k (key, value) pairs
    from its own (row, head) of the memory, local and memory attention are
    computed, and the segment's keys and values are written to the memory,
    detached. Per head h the two are mixed by a learned gate
    ``g_h = sigmoid(b_h)``: ``out = g * memory_attention + (1 - g) * local_attention``.

    Gradients reach the queries through the memory scores, recomputed here
    as ``q . k_retrieved`` with the retrieved keys as constants, and reach
    the gate; nothing reaches stored keys or values.

    Empty memory: masked neighbour slots are left out of the memory softmax;
    a query with no neighbour at all (its row's memory is empty) gets no
    memory attention and its gate is taken as 0 for that query, so it sees
    plain local attention instead of a mix with zeros.

    Args:
        dim: model width; input and output are [batch, tokens, dim].
        num_heads, head_dim: attention heads and the size of each.
        memory: a ``kvmemory.Memory`` with key_dim = value_dim = head_dim and
            num_heads heads, or a dict of ``Memory`` keyword arguments. From a
            dict the layer fills in key_dim, value_dim, num_heads, metric
            ("ip", natural on normalised keys) and, unless given, batch_size
            and device (backend "torch") from the first input; the memory is
            then built at the first forward. Either way ``memory.batch_size``
            must equal the input batch. The memory is not a submodule:
            ``module.to(device)`` does not move it.
        k: neighbours retrieved per query and head.
        normalize_qk: L2-normalise queries and keys, with a learned per-head
            logit scale (inverse temperature) initialised to ``init_scale``
            (default sqrt(head_dim), which matches unnormalised attention for
            unit-variance vectors). Off: logits are q.k / sqrt(head_dim).
        xl_cache: also attend locally to the previous segment's keys/values.
        gate_init: initial gate bias b (g = sigmoid(b); 0 gives g = 0.5).
        bias: whether the q/k/v/out projections have biases.

    Attribute ``update_memory`` (default True) controls whether a forward
    writes its keys/values to the memory; see :func:`frozen_memories`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, memory: Memory | dict, k: int = 32,
                 normalize_qk: bool = True, init_scale: float | None = None, xl_cache: bool = False,
                 gate_init: float = 0.0, bias: bool = False):
        super().__init__()
        dim, num_heads, head_dim, k = (check_int_option(name, value) for name, value in
                                       (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim), ("k", k)))
        self.dim, self.num_heads, self.head_dim, self.k = dim, num_heads, head_dim, k
        self.normalize_qk, self.xl_cache = normalize_qk, xl_cache
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)
        self.gate_bias = nn.Parameter(torch.full((num_heads,), float(gate_init)))
        if normalize_qk:
            scale = math.sqrt(head_dim) if init_scale is None else float(init_scale)
            self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale)))
        self.update_memory = True
        self._xl = None  # (keys [B,H,Tx,D], values [B,H,Tx,D], valid [B]) of the previous segment

        self.memory_kwargs = None
        self.memory = None
        if isinstance(memory, Memory):
            self._check_memory(memory)
            self.memory = memory
        elif isinstance(memory, dict):
            self.memory_kwargs = self._memory_kwargs(memory)
        else:
            raise TypeError(f"memory must be a kvmemory.Memory or a dict of its arguments, got {type(memory).__name__}")

    # -- memory ----------------------------------------------------------------
    def _memory_kwargs(self, kwargs: dict) -> dict:
        fixed = {"key_dim": self.head_dim, "value_dim": self.head_dim, "num_heads": self.num_heads}
        for name, value in fixed.items():
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"memory {name}={kwargs[name]} does not match the layer's {value}")
        return {"metric": "ip", **kwargs, **fixed}

    def _check_memory(self, memory: Memory) -> None:
        for name, want in (("key_dim", self.head_dim), ("value_dim", self.head_dim), ("num_heads", self.num_heads)):
            if getattr(memory, name) != want:
                raise ValueError(f"memory has {name}={getattr(memory, name)}, the layer needs {want}")

    def _memory_for(self, x: torch.Tensor) -> Memory:
        if self.memory is None:
            kwargs = dict(self.memory_kwargs)
            kwargs.setdefault("batch_size", x.shape[0])
            if kwargs.get("backend") == "torch":
                kwargs.setdefault("device", str(x.device))
            self.memory = Memory(**kwargs)
        memory = self.memory
        if memory.batch_size != x.shape[0]:
            raise ValueError(
                f"input batch is {x.shape[0]} but the memory has batch_size={memory.batch_size}: "
                f"each batch row owns one memory row, so the two must match"
            )
        device = bridge.memory_device(memory)
        if device is not None and resolve_device(x.device) != device:
            raise ValueError(f"input is on {x.device} but the memory lives on {device}; "
                             f"build the memory with device={str(x.device)!r}")
        return memory

    def reset_memory(self) -> None:
        """Forget every row of the memory and the XL cache."""
        if self.memory is not None:
            self.memory.clear()
        self._xl = None

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; doc_start [B] bool flags rows whose document starts here."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, tokens, dim={self.dim}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        memory = self._memory_for(x)
        if doc_start is not None:
            doc_start = torch.as_tensor(doc_start, device=x.device)
            if doc_start.dtype != torch.bool or tuple(doc_start.shape) != (B,):
                raise ValueError(f"doc_start must be a bool tensor [batch={B}], got "
                                 f"{doc_start.dtype} {tuple(doc_start.shape)}")
            bridge.clear(memory, doc_start)
            if self._xl is not None:
                self._xl = (*self._xl[:2], self._xl[2] & ~doc_start)

        q = self.to_q(x).view(B, T, H, D)
        k = self.to_k(x).view(B, T, H, D)
        v = self.to_v(x).view(B, T, H, D)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
            scale = self.log_scale.exp()[:, None]                           # [H,1]
        else:
            scale = torch.full((H, 1), D ** -0.5, dtype=x.dtype, device=x.device)
        q_scaled = q * scale

        local = self._local_attention(q_scaled, k, v)                        # [B,T,H,D]
        mem, has_memory = self._memory_attention(memory, q, q_scaled)        # [B,T,H,D], [B,T,H,1]
        gate = torch.sigmoid(self.gate_bias)[:, None] * has_memory
        out = gate * mem + (1 - gate) * local

        if self.update_memory:
            bridge.add(memory, k, v)
        if self.xl_cache:
            self._xl = (k.detach().transpose(1, 2), v.detach().transpose(1, 2),
                        torch.ones(B, dtype=torch.bool, device=x.device))
        return self.to_out(out.reshape(B, T, H * D))

    def _local_attention(self, q, k, v):
        """Causal attention within the segment (and to the XL cache), all [B,T,H,D]; q pre-scaled."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B,H,T,D]
        xl = self._xl
        if not self.xl_cache or xl is None or xl[0].shape[0] != q.shape[0] or xl[0].device != q.device:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            return out.transpose(1, 2)
        xk, xv, valid = xl
        T, Tx = q.shape[2], xk.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = torch.cat([valid[:, None, None].expand(-1, T, Tx), causal.expand(q.shape[0], T, T)], -1)
        out = F.scaled_dot_product_attention(
            q, torch.cat([xk.to(k.dtype), k], 2), torch.cat([xv.to(v.dtype), v], 2),
            attn_mask=mask[:, None], scale=1.0,
        )
        return out.transpose(1, 2)

    def _memory_attention(self, memory: Memory, q, q_scaled):
        """Attention of q [B,T,H,D] over its k neighbours -> ([B,T,H,D], has_memory [B,T,H,1])."""
        res = bridge.search(memory, q, self.k)
        keys = res.keys.to(q.dtype)                                          # constants
        values = res.values.to(q.dtype)
        logits = torch.einsum("bthd,bthkd->bthk", q_scaled, keys)
        has_memory = res.mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~res.mask, float("-inf"))
        logits = torch.where(has_memory, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        weights = torch.softmax(logits, -1) * res.mask
        return torch.einsum("bthk,bthkd->bthd", weights, values), has_memory.to(q.dtype)


def knn_layers(model: nn.Module):
    """Every KNNAttention inside ``model`` (the model itself included)."""
    return [m for m in model.modules() if isinstance(m, KNNAttention)]


def reset_memories(model: nn.Module) -> None:
    """Forget everything the KNNAttention layers of ``model`` hold (memories and XL caches)."""
    for layer in knn_layers(model):
        layer.reset_memory()


@contextlib.contextmanager
def frozen_memories(model: nn.Module):
    """Within the block, KNNAttention layers read their memories but write nothing to them."""
    layers = knn_layers(model)
    before = [layer.update_memory for layer in layers]
    for layer in layers:
        layer.update_memory = False
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.update_memory = flag
