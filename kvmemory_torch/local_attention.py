"""LocalAttention: causal self-attention over a segment, optionally also over the previous one (XL cache)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvmemory.validation import check_int_option

from . import rotary


class LocalAttention(nn.Module):
    """Multi-head causal self-attention over the segment, as a Memorizing Transformer's plain layers run it.

    Documents are fed segment by segment (Transformer-XL style). With
    ``xl_cache`` each segment also attends to the previous segment's keys
    and values (detached: no gradient crosses segments); ``doc_start`` [B]
    bool drops the cache of rows whose document starts with this segment.

    Args:
        dim: model width; input and output are [batch, tokens, dim].
        num_heads, head_dim: attention heads and the size of each.
        normalize_qk: L2-normalise queries and keys, with a learned per-head
            logit scale (inverse temperature) initialised to ``init_scale``
            (default sqrt(head_dim), which matches unnormalised attention for
            unit-variance vectors). Off: logits are q.k / sqrt(head_dim).
        xl_cache: also attend to the previous segment's keys/values.
        rotary: rotary position embedding of queries and keys (positions
            count from the start of the XL cache); off: no position
            information inside the layer (the model must supply it).
        smear_keys: each key becomes ``k_t + sigmoid(a_h) * (k_{t-1} - k_t)``
            with a learned per-head ``a_h`` (initially 0: half each), the
            "smeared key" of Olsson et al. (2022). A key then tells what came
            just before it, so one layer can learn to copy (match the current
            token against the token before a past position, then read that
            position's value), where plain attention needs two layers and far
            more training. The previous segment's last key is kept for the
            first key of a segment (within a document; none at its start).
        dconv: width of a causal depthwise convolution over time applied to
            the queries, keys and values of every head (Primer's multi-dconv-head
            attention, So et al. 2021), before ``smear_keys``; 0 (default) or 1:
            none. Initialised to the identity (all weight on the current
            position). A query then describes the last ``dconv`` tokens and a
            key can describe the ones before it, so one layer can match a
            multi-token context: one byte is ambiguous in a memory of thousands
            of random bytes, three are not. Carried across segments like the
            smeared key.
        bias: whether the q/k/v/out projections have biases.
        causal: False makes the layer bidirectional (every token attends to
            every token of its sequence, e.g. RETRO's neighbour encoder);
            ``forward``'s ``key_mask`` [B, T] bool then leaves padding out.
            Not with ``xl_cache``, ``smear_keys`` or ``dconv``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, normalize_qk: bool = True,
                 init_scale: float | None = None, xl_cache: bool = False, rotary: bool = False,
                 smear_keys: bool = False, dconv: int = 0, bias: bool = False, causal: bool = True):
        super().__init__()
        dim, num_heads, head_dim = (check_int_option(name, value) for name, value in
                                    (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim)))
        dconv = check_int_option("dconv", dconv, minimum=0)
        if rotary and head_dim % 2:
            raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
        if not causal and (xl_cache or smear_keys or dconv > 1):
            raise ValueError("causal=False (bidirectional attention) cannot be combined with xl_cache, smear_keys "
                             "or dconv")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.normalize_qk, self.xl_cache, self.rotary, self.smear_keys = normalize_qk, xl_cache, rotary, smear_keys
        self.causal = causal
        self.dconv = dconv if dconv > 1 else 0
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim, bias=bias)
        if normalize_qk:
            scale = math.sqrt(head_dim) if init_scale is None else float(init_scale)
            self.log_scale = nn.Parameter(torch.full((num_heads,), math.log(scale)))
        if smear_keys:
            self.smear_logit = nn.Parameter(torch.zeros(num_heads))
        if self.dconv:
            taps = torch.zeros(self.dconv, 3, num_heads, head_dim)             # [tap (0 = now), q/k/v, H, D]
            taps[0] = 1.0
            self.dconv_weight = nn.Parameter(taps)
        self._xl = None  # (keys [B,T,H,D], values [B,T,H,D], valid [B]) of the previous segment
        self._last_key = None  # (raw key [B,H,D], valid [B]) of the previous segment's last token
        self._history = None   # (raw q/k/v [B,dconv-1,3,H,D], valid [B]) of the previous segment's last tokens

    def forward(self, x: torch.Tensor, doc_start: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; doc_start [B] bool flags rows whose document starts here.

        key_mask [B, T] bool (``causal=False`` only): True on real tokens; a
        row without any gets uniform attention (its output is padding anyway).
        """
        doc_start = self._check_input(x, doc_start)
        if key_mask is not None:
            if self.causal:
                raise ValueError("key_mask is for a bidirectional layer (causal=False)")
            if key_mask.dtype != torch.bool or tuple(key_mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"key_mask must be a bool tensor [batch, tokens]={tuple(x.shape[:2])}, got "
                                 f"{key_mask.dtype} {tuple(key_mask.shape)}")
        self._start_documents(doc_start)
        q, k, v = self._qkv(x)
        out = self._local_attention(q, k, v, key_mask)
        self._remember_segment(k, v)
        return self._output(out)

    def reset_cache(self) -> None:
        """Forget the XL cache (and the last key, with smear_keys; the last tokens, with dconv)."""
        self._xl = None
        self._last_key = None
        self._history = None

    # -- pieces shared with KNNAttention -----------------------------------------------
    def _check_input(self, x: torch.Tensor, doc_start) -> torch.Tensor | None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [batch, tokens, dim={self.dim}], got shape {tuple(x.shape)}")
        if doc_start is None:
            return None
        B = x.shape[0]
        doc_start = torch.as_tensor(doc_start, device=x.device)
        if doc_start.dtype != torch.bool or tuple(doc_start.shape) != (B,):
            raise ValueError(f"doc_start must be a bool tensor [batch={B}], got "
                             f"{doc_start.dtype} {tuple(doc_start.shape)}")
        return doc_start

    def _start_documents(self, doc_start: torch.Tensor | None) -> None:
        if doc_start is None:
            return
        if self._xl is not None and self._xl[2].shape == doc_start.shape:
            self._xl = (*self._xl[:2], self._xl[2] & ~doc_start)
        if self._last_key is not None and self._last_key[1].shape == doc_start.shape:
            self._last_key = (self._last_key[0], self._last_key[1] & ~doc_start)
        if self._history is not None and self._history[1].shape == doc_start.shape:
            self._history = (self._history[0], self._history[1] & ~doc_start)

    def _qkv(self, x: torch.Tensor):
        """Queries, keys, values [B,T,H,D] (q and k unit vectors when normalize_qk)."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (proj(x).view(B, T, H, D) for proj in (self.to_q, self.to_k, self.to_v))
        if self.dconv:
            q, k, v = self._convolve(torch.stack([q, k, v], 2)).unbind(2)
        if self.smear_keys:
            k = self._smear(k)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q, k, v

    def _convolve(self, qkv: torch.Tensor) -> torch.Tensor:
        """[B,T,3,H,D] -> the same, each channel a causal mix of its last ``dconv`` positions (see ``dconv``)."""
        B, T = qkv.shape[:2]
        before = qkv.new_zeros(B, self.dconv - 1, *qkv.shape[2:])
        history = self._history
        if history is not None and history[0].shape[0] == B and history[0].device == qkv.device:
            before = history[0].to(qkv.dtype) * history[1][:, None, None, None, None]
        padded = torch.cat([before, qkv], 1)
        self._history = (padded[:, T:].detach(), torch.ones(B, dtype=torch.bool, device=qkv.device))
        return sum(self.dconv_weight[tap] * padded[:, self.dconv - 1 - tap:self.dconv - 1 - tap + T]
                   for tap in range(self.dconv))

    def _smear(self, k: torch.Tensor) -> torch.Tensor:
        """Keys [B,T,H,D] mixed with the key before each (see ``smear_keys``); remembers the last raw key."""
        B = k.shape[0]
        last = self._last_key
        if last is not None and last[0].shape[0] == B and last[0].device == k.device:
            first = torch.where(last[1][:, None, None], last[0].to(k.dtype), k[:, 0])
        else:
            first = k[:, 0]
        before = torch.cat([first[:, None], k[:, :-1]], 1)
        self._last_key = (k[:, -1].detach(), torch.ones(B, dtype=torch.bool, device=k.device))
        return k + torch.sigmoid(self.smear_logit)[:, None] * (before - k)

    def _logit_scale(self, q: torch.Tensor) -> torch.Tensor:
        """[H, 1]: what q is multiplied by before its dot products."""
        if self.normalize_qk:
            return self.log_scale.exp()[:, None]
        return torch.full((self.num_heads, 1), self.head_dim ** -0.5, dtype=q.dtype, device=q.device)

    def _local_attention(self, q, k, v, key_mask=None):
        """Causal attention within the segment (and to the XL cache): q, k, v [B,T,H,D] -> [B,T,H,D]."""
        xl = self._xl
        if not self.xl_cache or xl is None or xl[0].shape[0] != q.shape[0] or xl[0].device != q.device:
            xl = None
        Tx = 0 if xl is None else xl[0].shape[1]
        q = q * self._logit_scale(q)
        if xl is not None:
            k, v = torch.cat([xl[0].to(k.dtype), k], 1), torch.cat([xl[1].to(v.dtype), v], 1)
        if self.rotary:
            q, k = rotary.rotate(q, start=Tx), rotary.rotate(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # [B,H,*,D]
        if not self.causal:
            mask = None
            if key_mask is not None:
                mask = (key_mask | ~key_mask.any(-1, keepdim=True))[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        elif xl is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
        else:
            B, T = q.shape[0], q.shape[2]
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            mask = torch.cat([xl[2][:, None, None].expand(-1, T, Tx), causal.expand(B, T, T)], -1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=1.0)
        return out.transpose(1, 2)

    def _remember_segment(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.xl_cache:
            self._xl = (k.detach(), v.detach(), torch.ones(k.shape[0], dtype=torch.bool, device=k.device))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        B, T = out.shape[:2]
        return self.to_out(out.reshape(B, T, self.num_heads * self.head_dim))
