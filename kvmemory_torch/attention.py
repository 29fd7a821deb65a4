"""KNNAttention: the kNN-augmented attention layer of Memorizing Transformers (Wu et al., 2022)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from kvmemory import Memory
from kvmemory.validation import check_int_option

from . import bridge
from .backend import resolve_device
from .local_attention import LocalAttention


class KNNAttention(LocalAttention):
    """Causal self-attention over the segment plus attention over k neighbours from a memory.

    Per segment (the paper's order): rows flagged by ``doc_start`` are cleared
    (memory and XL cache), every query retrieves its top-k (key, value) pairs
    from its own (row, head) of the memory, local and memory attention are
    computed, and the segment's keys and values are written to the memory,
    detached. Per head h the two are mixed by a learned gate
    ``g_h = sigmoid(b_h)``: ``out = g * memory_attention + (1 - g) * local_attention``.

    Gradients reach the queries through the memory scores, recomputed here
    as ``q . k_retrieved`` with the retrieved keys as constants, and reach
    the gate; nothing reaches stored keys or values. The memory path carries
    no position information: stored keys are the (normalised) keys before
    any rotary embedding, and queries search with theirs likewise.

    Empty memory: masked neighbour slots are left out of the memory softmax;
    a query with no neighbour at all (its row's memory is empty) gets no
    memory attention and its gate is taken as 0 for that query, so it sees
    plain local attention instead of a mix with zeros.

    Args:
        dim, num_heads, head_dim, normalize_qk, init_scale, xl_cache, rotary,
            bias: as :class:`LocalAttention`, whose parameters this layer
            shares by name (so a trained plain layer's weights load into it:
            see ``MemorizingTransformer.add_memory``).
        memory: a ``kvmemory.Memory`` with key_dim = value_dim = head_dim and
            num_heads heads, or a dict of ``Memory`` keyword arguments. From a
            dict the layer fills in key_dim, value_dim, num_heads, metric
            ("ip", natural on normalised keys) and, unless given, batch_size
            and device (backend "torch") from the first input; the memory is
            then built at the first forward. Either way ``memory.batch_size``
            must equal the input batch. The memory is not a submodule:
            ``module.to(device)`` does not move it.
        k: neighbours retrieved per query and head.
        gate_init: initial gate bias b (g = sigmoid(b); 0 gives g = 0.5).

    Attribute ``update_memory`` (default True) controls whether a forward
    writes its keys/values to the memory; see :func:`frozen_memories`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, memory: Memory | dict, k: int = 32,
                 normalize_qk: bool = True, init_scale: float | None = None, xl_cache: bool = False,
                 gate_init: float = 0.0, bias: bool = False, rotary: bool = False):
        super().__init__(dim, num_heads, head_dim, normalize_qk=normalize_qk, init_scale=init_scale,
                         xl_cache=xl_cache, rotary=rotary, bias=bias)
        self.k = check_int_option("k", k)
        self.gate_bias = nn.Parameter(torch.full((self.num_heads,), float(gate_init)))
        self.update_memory = True

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
        self.reset_cache()

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; doc_start [B] bool flags rows whose document starts here."""
        doc_start = self._check_input(x, doc_start)
        memory = self._memory_for(x)
        if doc_start is not None:
            bridge.clear(memory, doc_start)
        self._start_documents(doc_start)

        q, k, v = self._qkv(x)
        local = self._local_attention(q, k, v)                               # [B,T,H,D]
        mem, has_memory = self._memory_attention(memory, q)                  # [B,T,H,D], [B,T,H,1]
        gate = torch.sigmoid(self.gate_bias)[:, None] * has_memory
        out = gate * mem + (1 - gate) * local

        if self.update_memory:
            bridge.add(memory, k, v)
        self._remember_segment(k, v)
        return self._output(out)

    def _memory_attention(self, memory: Memory, q):
        """Attention of q [B,T,H,D] over its k neighbours -> ([B,T,H,D], has_memory [B,T,H,1])."""
        res = bridge.search(memory, q, self.k)
        keys = res.keys.to(q.dtype)                                          # constants
        values = res.values.to(q.dtype)
        logits = torch.einsum("bthd,bthkd->bthk", q * self._logit_scale(q), keys)
        has_memory = res.mask.any(-1, keepdim=True)
        logits = logits.masked_fill(~res.mask, float("-inf"))
        logits = torch.where(has_memory, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        weights = torch.softmax(logits, -1) * res.mask
        return torch.einsum("bthk,bthkd->bthd", weights, values), has_memory.to(q.dtype)


def knn_layers(model: nn.Module):
    """Every KNNAttention inside ``model`` (the model itself included)."""
    return [m for m in model.modules() if isinstance(m, KNNAttention)]


def reset_memories(model: nn.Module) -> None:
    """Forget everything the attention layers of ``model`` hold: KNNAttention memories and every XL cache."""
    for layer in model.modules():
        if isinstance(layer, KNNAttention):
            layer.reset_memory()
        elif isinstance(layer, LocalAttention):
            layer.reset_cache()


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
