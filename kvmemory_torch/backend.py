"""backend="torch": exact top-k over ring buffers that live on a torch device.

Storage (all on ``device``; B rows, H heads, C capacity):

    keys     [B, H, C, Dk] float32
    values   [B, H, C, Dv] float32
    row_counts [B] int64, entries added per row since its last clear
    sqnorms  [B, H, C] float32, squared key norms (metrics cosine and l2 only)
    scan_keys [B, H, C, Dk] score_dtype, what the scan multiplies: the keys
             (ip, l2) or the unit keys k/|k| (cosine; 0 where |k| = 0). None
             when it would equal ``keys`` (float32 scoring, ip or l2).

Stream id ``i`` of row b lives in slot ``i % C``; because ids restart at 0
after a clear, a row's live slots are the prefix ``[0, min(counts[b], C))``.
Writes are one ``index_put_`` per buffer with slots computed on the device
from ``row_counts``; clears only zero counters. Nothing is ever reallocated.

The host keeps ``_upper`` [B], an upper bound on counts (exact except after
``clear_mask_tensor``), so that a search scans only the capacity that can be
filled without reading ``counts`` back from the device.
"""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import torch

from kvmemory.backends.base import Backend
from kvmemory.backends.result_buffer import ResultBuffer
from kvmemory.backends.topk import blocked_topk
from kvmemory.metrics import scores_from_ranked
from kvmemory.result import SearchResult
from kvmemory.validation import FLOAT_DTYPES, check_int_option

SCORE_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device) -> torch.device:
    """A torch.device with an explicit index for cuda ("cuda" -> "cuda:0")."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device or its name, got {device!r}: {e}") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_score_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in SCORE_DTYPES:
        raise ValueError(
            f"score_dtype must be one of float32, bfloat16, float16 (or a torch dtype), got {dtype!r}"
        )
    return SCORE_DTYPES[dtype]


def _block_topk(s: torch.Tensor, m: int):
    """Top m (unsorted) of s [G, T, W] along W: (values, indices), both [G, T, m].

    Wide blocks go through group maxima: column j is in group ``j % (W / group)``;
    the m groups with the largest maxima hold every top-m column (one outside them is
    beaten by m group maxima), so topk runs over W / group maxima and m * group
    members instead of W scores (amax is ~10x cheaper per score than topk on CPU).
    """
    W = s.shape[-1]
    group = 1 << max(2, round(math.log2(math.sqrt(W / m)))) if W > m else 1
    if group == 1 or W % group or W < 4 * m * group:
        return torch.topk(s, m, dim=-1, sorted=False)
    ngr = W // group
    maxima = s.view(*s.shape[:-1], group, ngr).amax(dim=-2)                          # [G, T, ngr]
    top = torch.topk(maxima, m, dim=-1, sorted=False).indices                        # [G, T, m]
    cols = (top[..., None] + ngr * torch.arange(group, device=s.device)).flatten(-2)  # [G, T, m * group]
    vals, pick = torch.topk(s.gather(-1, cols), m, dim=-1, sorted=False)
    return vals, cols.gather(-1, pick)


class TorchBackend(Backend):
    """Exact (or low-precision-then-exact) top-k on a torch device, all rows and heads at once.

    Build options:
        device: where storage lives and results are returned ("cuda", "cuda:1",
            "cpu", a torch.device; default cuda if available). Saved as a string.
        score_dtype: dtype of the scan matmul: "float32" (exact), "bfloat16" or
            "float16". Low precision fetches ``rescore_factor * k`` candidates
            and re-scores them exactly in float32 before the final top-k.
            float16 overflows for |q . k| or |k|^2 above ~65,000 (norms above
            ~180), after which ranking degrades: prefer bfloat16, which has
            float32's range.
        block_bytes: most bytes of scores held at once per scan tile (default 256 MiB).
        check_finite: refuse NaN/inf inputs (default True). The check reads one
            bool back from the device per call; False removes that sync.
    Search options:
        rescore_factor: candidates per query = rescore_factor * k in low
            precision (default 2); ignored for float32 scoring.
    """

    name = "torch"
    build_options = {"device": None, "score_dtype": "float32", "block_bytes": 256 << 20,
                     "check_finite": True}
    search_options = {"rescore_factor": 2}
    accepted_dtypes = FLOAT_DTYPES + ("bfloat16",)

    def __init__(self, config, **options):
        super().__init__(config, **options)
        self.device = resolve_device(self.options["device"])
        self.score_dtype = resolve_score_dtype(self.options["score_dtype"])
        self.options["device"] = str(self.device)
        self.options["score_dtype"] = str(self.score_dtype).removeprefix("torch.")
        self.options["block_bytes"] = check_int_option("block_bytes", self.options["block_bytes"])
        if not isinstance(self.options["check_finite"], bool):
            raise ValueError(f"check_finite must be a bool, got {self.options['check_finite']!r}")
        self.search_args = self.check_search_options(self.search_args)

        B, H, C = config.batch_size, config.num_heads, config.capacity
        f32 = dict(dtype=torch.float32, device=self.device)
        self.keys = torch.zeros(B, H, C, config.key_dim, **f32)
        self.values = torch.zeros(B, H, C, config.value_dim, **f32)
        self.row_counts = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.sqnorms = torch.zeros(B, H, C, **f32) if config.metric != "ip" else None
        self.scan_keys = (torch.zeros(B, H, C, config.key_dim, dtype=self.score_dtype, device=self.device)
                          if self.score_dtype != torch.float32 or config.metric == "cosine" else None)
        self._upper = np.zeros(B, np.int64)
        self._pool = None                                  # CPU scans: threads of the numpy kernel
        self._results = ResultBuffer()                     # CPU: where keys and values are gathered

    def check_search_options(self, options: dict) -> dict:
        if "rescore_factor" in options:
            options = {**options, "rescore_factor": check_int_option("rescore_factor", options["rescore_factor"])}
        return options

    # -- arrays ------------------------------------------------------------------
    def convert(self, x) -> torch.Tensor:
        """A torch tensor on ``device`` (or a numpy array) as a detached float32 tensor on ``device``.

        Tensors on another device are refused rather than silently copied.
        """
        if isinstance(x, torch.Tensor):
            if not self._on_device(x):
                raise ValueError(
                    f"tensor is on {x.device} but this memory lives on {self.device}; move it "
                    f"there or build the memory with device={str(x.device)!r}"
                )
            return x.detach().to(torch.float32)
        with np.errstate(over="ignore"):  # overflow to inf is reported by all_finite
            return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)

    def all_finite(self, x: torch.Tensor) -> bool:
        if not self.options["check_finite"]:
            return True
        return bool(torch.isfinite(x).all())

    def _on_device(self, x: torch.Tensor) -> bool:
        d = x.device
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        return d == self.device

    # -- writing -------------------------------------------------------------------
    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append keys [B,T,H,Dk] and values [B,T,H,Dv]; of T > C only the last C are written."""
        C = self.config.capacity
        B, T = keys.shape[:2]
        skip = max(T - C, 0)
        keys, values = keys[:, skip:], values[:, skip:]                     # [B,n,H,D]
        offsets = torch.arange(skip, T, device=self.device)
        slots = (self.row_counts[:, None] + offsets) % C  # [B,n]
        rows = torch.arange(B, device=self.device)[:, None]
        self.keys.transpose(1, 2)[rows, slots] = keys                       # [B,C,H,D] view
        self.values.transpose(1, 2)[rows, slots] = values
        if self.sqnorms is not None:
            self.sqnorms.transpose(1, 2)[rows, slots] = (keys * keys).sum(-1)
        if self.scan_keys is not None:
            self.scan_keys.transpose(1, 2)[rows, slots] = self._scan_form(keys)
        self.row_counts += T
        self._upper += T

    def _scan_form(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [..., D] float32 as the scan stores them (unit vectors for cosine), in score_dtype."""
        if self.config.metric == "cosine":
            sq = (keys * keys).sum(-1, keepdim=True)
            keys = keys * torch.where(sq > 0, sq.rsqrt(), 0.0)
        return keys.to(self.score_dtype)

    def rows_mask(self, rows):
        """A bool tensor [B] on ``device`` is kept as it is (no host sync); anything else as in Memory.clear."""
        if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool and self._on_device(rows):
            B = self.config.batch_size
            if tuple(rows.shape) != (B,):
                raise ValueError(f"rows as a bool mask must have shape ({B},), got {tuple(rows.shape)}")
            return rows
        return super().rows_mask(rows)

    @torch.no_grad()
    def clear(self, mask) -> None:
        """Forget the rows of ``mask`` [B] bool (numpy, as Memory.clear passes it, or a tensor)."""
        if isinstance(mask, torch.Tensor):
            self.clear_mask_tensor(mask)
            return
        mask = np.asarray(mask, dtype=bool)
        self.row_counts.masked_fill_(torch.as_tensor(mask, device=self.device), 0)
        self._upper[mask] = 0

    @torch.no_grad()
    def clear_mask_tensor(self, mask: torch.Tensor) -> None:
        """Forget the rows of a bool tensor ``mask`` [B] on ``device``, with no host sync."""
        B = self.config.batch_size
        if mask.dtype != torch.bool or tuple(mask.shape) != (B,):
            raise ValueError(f"mask must be a bool tensor of shape ({B},), got {mask.dtype} {tuple(mask.shape)}")
        if not self._on_device(mask):
            raise ValueError(f"mask is on {mask.device} but this memory lives on {self.device}")
        self.row_counts.masked_fill_(mask, 0)

    def counts_tensor(self) -> torch.Tensor:
        """[B] int64 on ``device``: entries added per row since its last clear (no sync)."""
        return self.row_counts.clone()

    def counts(self) -> np.ndarray:
        counts = self.row_counts.cpu().numpy().copy()
        self._upper[...] = counts
        return counts

    # -- search ----------------------------------------------------------------------
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, with_entries: bool = True) -> SearchResult:
        B, T, H, D = queries.shape
        C = self.config.capacity
        n_max = int(min(self._upper.max(initial=0), C))
        low_precision = self.score_dtype != torch.float32
        m = min(k * self.search_args["rescore_factor"] if low_precision else k, n_max)
        if m == 0 or T == 0:
            return self._empty(B, T, H, k, with_entries)

        q = queries.transpose(1, 2).reshape(B * H, T, D)                     # [G,T,D]
        n_valid = torch.clamp(self.row_counts, max=C).repeat_interleave(H)  # [G]
        slots, scores = self._scan(q, n_valid, m, n_max)                     # [G,T,m]
        valid = slots < n_valid[:, None, None]
        if scores is None:                                                   # low precision: rescore exactly
            scores = self._exact_scores(q, slots)                            # [G,T,m]
        scores = scores.masked_fill(~valid, float("-inf"))
        kk = min(k, m)
        scores, order = torch.topk(scores, kk, dim=-1)                       # sorted, best first
        slots = slots.gather(-1, order)
        mask = valid.gather(-1, order)

        lo = torch.clamp(self.row_counts - C, min=0).repeat_interleave(H)[:, None, None]
        ids = torch.where(mask, lo + (slots - lo) % C, -1)
        scores = scores.masked_fill(~mask, 0.0)

        def out(x):  # [G,T,kk,...] -> [B,T,H,k,...], padded with zeros (ids: -1)
            x = x.reshape(B, H, T, kk, *x.shape[3:]).transpose(1, 2)
            if kk < k:
                pad = x.new_zeros(B, T, H, k - kk, *x.shape[4:])
                x = torch.cat([x, pad if x.dtype != torch.int64 else pad - 1], 3)
            return x.contiguous()

        keys = values = None
        if with_entries:
            # gathered straight into [B,T,H,k] order, so the big results are never transposed or copied
            flat = out(torch.where(mask, slots, 0) + (torch.arange(B * H, device=self.device) * C)[:, None, None])
            flat = flat.clamp_(min=0)                                        # padding (-1) reads row 0, masked
            present = out(mask)[..., None]
            keys, values = (x.masked_fill_(~present, 0.0) for x in self._take(flat, self.keys, self.values))
        return SearchResult(keys=keys, values=values, scores=out(scores), ids=out(ids), mask=out(mask))

    def _scan(self, q: torch.Tensor, n_valid: torch.Tensor, m: int, n_max: int):
        """(slots [G,T,m], scores) of the m best ranked keys among the first n_max, tile by tile.

        scores: the float32 metric scores of those slots when the scan computed them exactly
        (float32 on the CPU, ``_scan_host``), else None.

        The ranked score is the metric up to a per-query monotone map: q.k
        (ip), q.k/|k| (cosine), 2 q.k - |k|^2 (l2). It is one ``baddbmm`` per
        tile whose per-column bias carries -|k|^2 (l2) and -inf for slots
        >= n_valid[g], which the caller masks.
        """
        if self.device.type == "cpu" and self.score_dtype == torch.float32:
            return self._scan_host(q, n_valid, m, n_max)
        G, T, D = q.shape
        C = self.config.capacity
        dtype = self.score_dtype
        elem = torch.finfo(dtype).bits // 8
        keys = (self.scan_keys if self.scan_keys is not None else self.keys).view(G, C, D)
        q = q.to(dtype)
        valid = torch.arange(n_max, device=self.device) < n_valid[:, None]              # [G,n_max]
        if self.config.metric == "l2":
            bias = torch.where(valid, -self.sqnorms.view(G, C)[:, :n_max], float("-inf"))
        else:
            bias = torch.where(valid, 0.0, float("-inf"))
        bias = bias.to(dtype)[:, None]                                                  # [G,1,n_max]
        alpha = 2 if self.config.metric == "l2" else 1
        budget = self.options["block_bytes"]
        col_block = min(n_max, max(m, budget // max(G * T * elem, 1)))
        row_block = max(1, min(T, budget // max(G * col_block * elem, 1)))

        parts = []
        for t0 in range(0, T, row_block):
            qt = q[:, t0:t0 + row_block]
            best_s = best_i = None
            for c0 in range(0, n_max, col_block):
                c1 = min(c0 + col_block, n_max)
                s = torch.baddbmm(bias[..., c0:c1], qt, keys[:, c0:c1].transpose(1, 2), alpha=alpha)
                top_s, top_i = _block_topk(s, min(m, c1 - c0))
                top_i += c0
                if best_s is not None:
                    top_s, top_i = torch.cat([best_s, top_s], -1), torch.cat([best_i, top_i], -1)
                    top_s, pick = torch.topk(top_s, min(m, top_s.shape[-1]), dim=-1, sorted=False)
                    top_i = top_i.gather(-1, pick)
                best_s, best_i = top_s, top_i
            parts.append(best_i)
        return (torch.cat(parts, 1) if len(parts) > 1 else parts[0]), None

    def _scan_host(self, q: torch.Tensor, n_valid: torch.Tensor, m: int, n_max: int):
        """``_scan`` on the CPU in float32: backend "exact"'s numpy kernel over the same memory.

        Its ranked scores are exact, so they come back as metric scores and the keys are not
        gathered again to rescore them (measured: 50 ms of a 300 ms step at 8,192 x 32 indices).

        torch.topk on CPU costs ~3 ns per score, more than the matmul; the numpy kernel
        (kvmemory/backends/topk.py) selects from group maxima it takes while each score
        tile is in cache (measured: 2-3x faster searches at 8,192-65,536 entries per
        (row, head), 32 of them). Slots it leaves empty (-1: a row holds fewer than m)
        come back as C - 1, which is >= n_valid of such a row, so the caller masks them.
        """
        G, T, D = q.shape
        C = self.config.capacity
        keys = (self.scan_keys if self.scan_keys is not None else self.keys).view(G, C, D)[:, :n_max].numpy()
        weight = bias = None
        if self.config.metric == "l2":
            weight, bias = np.float32(2.0), self.sqnorms.view(G, C)[:, :n_max].numpy()
        if self._pool is None:
            self._threads = max(1, torch.get_num_threads())
            self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, "kvmemory-torch")
        qn = np.ascontiguousarray(q.numpy())
        slots, ranked = blocked_topk(qn, keys, n_valid.numpy(), m, weight, bias,
                                     min(self.options["block_bytes"], 64 << 20),
                                     lambda fn, items: list(self._pool.map(fn, items)), self._threads)
        scores = scores_from_ranked(self.config.metric, ranked, qn)
        slots, scores = torch.from_numpy(slots), torch.from_numpy(np.ascontiguousarray(scores, np.float32))
        if slots.shape[-1] < m:  # n_max is an upper bound (no host sync on clear); the rows hold fewer
            slots = torch.cat([slots, slots.new_full((G, T, m - slots.shape[-1]), -1)], -1)
            scores = torch.cat([scores, scores.new_full((G, T, m - scores.shape[-1]), float("-inf"))], -1)
        return torch.where(slots >= 0, slots, C - 1), scores

    def _take(self, flat: torch.Tensor, *stores: torch.Tensor) -> list:
        """Rows of each store [B,H,C,X] at flat positions [...] -> [..., X]; on the CPU into one reused buffer."""
        if self.device.type != "cpu":
            return [s.view(-1, s.shape[-1]).index_select(0, flat.view(-1)).view(*flat.shape, s.shape[-1])
                    for s in stores]
        outs = self._results.lend_rows(flat.numel(), [s.shape[-1] for s in stores])
        return [torch.index_select(s.view(-1, s.shape[-1]), 0, flat.view(-1), out=torch.from_numpy(out))
                .view(*flat.shape, s.shape[-1]) for s, out in zip(stores, outs)]

    def _gather(self, store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """store [B,H,C,X] at slots [G,T,m] -> [G,T,m,X] (one index_select: far faster than gather on CPU)."""
        B, H, C, X = store.shape
        G, T, m = slots.shape
        flat = slots + (torch.arange(G, device=slots.device) * C)[:, None, None]
        return store.view(G * C, X).index_select(0, flat.view(-1)).view(G, T, m, X)

    def _exact_scores(self, q: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """float32 metric scores [G,T,m] of q [G,T,D] against the keys at slots [G,T,m]."""
        keys = self._gather(self.keys, slots)                                # [G,T,m,D]
        dots = torch.matmul(keys, q.unsqueeze(-1)).squeeze(-1)               # [G,T,m]
        metric = self.config.metric
        if metric == "ip":
            return dots
        G, T, m = slots.shape
        sq = self.sqnorms.view(G, -1).gather(1, slots.reshape(G, T * m)).view(G, T, m)
        q_sq = (q * q).sum(-1, keepdim=True)
        if metric == "l2":
            return -torch.clamp(q_sq - 2 * dots + sq, min=0)
        denom = torch.sqrt(q_sq * sq)
        return torch.where(denom > 0, dots / torch.where(denom > 0, denom, 1.0), 0.0)

    def _empty(self, B: int, T: int, H: int, k: int, with_entries: bool) -> SearchResult:
        c, dev = self.config, self.device
        return SearchResult(
            keys=torch.zeros(B, T, H, k, c.key_dim, device=dev) if with_entries else None,
            values=torch.zeros(B, T, H, k, c.value_dim, device=dev) if with_entries else None,
            scores=torch.zeros(B, T, H, k, device=dev),
            ids=torch.full((B, T, H, k), -1, dtype=torch.int64, device=dev),
            mask=torch.zeros(B, T, H, k, dtype=torch.bool, device=dev),
        )

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """keys, values (float32) and counts (int64) as numpy arrays."""
        return {"keys": self.keys.cpu().numpy(), "values": self.values.cpu().numpy(),
                "counts": self.row_counts.cpu().numpy()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        expected = {"keys": (self.keys, np.float32), "values": (self.values, np.float32),
                    "counts": (self.row_counts, np.int64)}
        arrays = {}
        for name, (current, dtype) in expected.items():
            if name not in state:
                raise ValueError(f"saved memory lacks {name!r}")
            arr = np.asarray(state[name])
            if arr.shape != tuple(current.shape) or arr.dtype != dtype:
                raise ValueError(f"saved {name!r} has shape {arr.shape} dtype {arr.dtype}, "
                                 f"expected {tuple(current.shape)} {np.dtype(dtype)}")
            arrays[name] = arr
        if (arrays["counts"] < 0).any():
            raise ValueError("saved 'counts' holds negative values")
        for name, arr in arrays.items():
            expected[name][0].copy_(torch.from_numpy(arr))
        if self.sqnorms is not None:
            self.sqnorms.copy_((self.keys * self.keys).sum(-1))
        if self.scan_keys is not None:
            self.scan_keys.copy_(self._scan_form(self.keys))
        self._upper[...] = arrays["counts"]
