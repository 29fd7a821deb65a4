"""Shard indices: the top-k search over one shard's embeddings, and its same-document filter.

A thin sibling of the segmented backends, not a ``Memory``: a shard is static
(no FIFO, no clearing, no rows or heads), its embeddings are memory-mapped
from the store, and its search needs a document filter. So a shard index
reuses exactly the pieces of the core that do the searching:

* ``"exact"``: the core's exact kernel (:func:`kvmemory.backends.topk.blocked_topk`,
  blocked BLAS matmul + exact two-stage top-k) over the memory-mapped
  embeddings; no index file. The reference every other type is measured against.
* ``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``, ``"scann"``, ``"hnsw"``: one
  :class:`~kvmemory.backends.segment_index.SegmentIndex` of the core
  (``FaissSegmentIndex``, ``ScannSegmentIndex``, ``HnswSegmentIndex``) over the
  whole shard, i.e. a one-segment, one-head, no-eviction use of what the
  segmented backends run per segment. Build and search options are resolved and
  validated by the same backend class (``FaissBackend``, ...) with
  ``segment_size`` = the shard's size, so defaults (nlist, nprobe, ScaNN
  leaves, HNSW M/ef, centring of inner-product graphs) are the library's. An
  index that computes approximate scores (IVF-PQ) is re-scored exactly from
  the embeddings; an index that could not be trained is searched exactly.

Wrapping a ``Memory`` instead would keep a second copy of every embedding in
its ring (in RAM, and again in its save file), and its search has no filter.

Options (``index_options``; unknown ones are refused by the backend class, naming the valid ones):
faiss types take the faiss backend's (``nlist``, ``M``, ``ef_construction``; search: ``nprobe``,
``ef_search``), ``"faiss-ivfpq"`` also ``pq_m`` (sub-quantizers, default dim / 8) and ``pq_nbits``
(default 8, or 4 for shards under 9,984 chunks, too few to train 256 centroids per codebook);
``"scann"`` the ScaNN backend's (``num_leaves``, ``tree_min_size``, ...; search: ``num_leaves_to_search``,
``reorder``); ``"hnsw"`` hnswlib's (``M``, ``ef_construction``; search: ``ef``). Defaults are the
backends', computed for a segment the size of the shard.

Same-document exclusion (:func:`search_excluding`) is a filter on ids: the
chunks of a document are a contiguous range of a shard's ids, and every
candidate inside an excluded range is dropped. Candidates are over-fetched:
at most ``banned`` of them (the chunks of the excluded documents in this
shard) can be dropped, so fetching ``k + banned`` always leaves the true top k.
The exact index fetches that bound at once (so its filtered result is exactly
the top k of the remaining chunks); approximate indices first fetch
``k + margin`` and fetch again, 4x more each time up to the bound, only for
the queries left with fewer than k; whatever is still missing is masked.
"""

from __future__ import annotations

import numpy as np

from ..backends.topk import blocked_topk
from ..config import MemoryConfig
from ..metrics import column_transform, score_candidates, scores_from_ranked
from ..registry import get_backend_class

METRICS = ("ip", "l2")
#: index type -> (kvmemory backend whose SegmentIndex it uses, fixed backend options); None: exact
INDEX_TYPES = {
    "exact": None,
    "faiss-ivf": ("faiss", {"index": "ivf"}),
    "faiss-ivfpq": ("faiss", {}),
    "faiss-hnsw": ("faiss", {"index": "hnsw"}),
    "scann": ("scann", {}),
    "hnsw": ("hnsw", {}),
}
DEFAULT_MARGIN = 64


def check_index_type(index_type: str) -> str:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index must be one of {sorted(INDEX_TYPES)}, got {index_type!r}")
    return index_type


def _backend(index_type: str, n: int, dim: int, metric: str, options: dict):
    """The kvmemory backend object that resolves and validates this type's options for a shard of n."""
    backend_name, fixed = INDEX_TYPES[index_type]
    options = dict(options)
    if index_type == "faiss-ivfpq":
        from ..backends.faiss import default_nlist
        nlist = options.pop("nlist", None) or default_nlist(n)
        m = options.pop("pq_m", None) or max(1, dim // 8)
        # faiss asks for >= 39 training points per centroid of each 2^nbits codebook (and trains
        # 8-bit codebooks on a few thousand points very slowly): small shards get 4-bit codes
        nbits = options.pop("pq_nbits", None) or (8 if n >= 39 * 256 else 4)
        if dim % m:
            raise ValueError(f"pq_m must divide the embedding dim {dim}, got {m}")
        # "np": no polysemous training (faiss' default for IVFPQ, ~30x slower, for Hamming filtering we never use)
        fixed = {"index": f"IVF{nlist},PQ{m}x{nbits}np", "nlist": nlist}
    clash = sorted(set(options) & set(fixed))
    if clash:
        raise ValueError(f"index {index_type!r} fixes option(s) {clash}")
    cls = get_backend_class(backend_name)          # ImportError naming the extra if the library is missing
    config = MemoryConfig(key_dim=dim, value_dim=1, capacity=max(n, 1), metric=metric)
    extra = {"device": "cpu"} if backend_name == "faiss" else {}
    return cls(config, segment_size=max(n, 1), exact_below=0, num_threads=1, **extra, **fixed, **options)


def resolve_options(index_type: str, n: int, dim: int, metric: str, options: dict | None = None) -> dict:
    """The resolved, validated options of an index over n embeddings of ``dim`` (JSON-able), as saved per shard."""
    check_index_type(index_type)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r} (normalise embeddings for cosine)")
    options = dict(options or {})
    if INDEX_TYPES[index_type] is None:
        if options:
            raise ValueError(f"index 'exact' takes no options, got {sorted(options)}")
        return {"type": "exact"}
    be = _backend(index_type, n, dim, metric, options)
    return {"type": index_type, "backend": INDEX_TYPES[index_type][0], "build": be.library_build,
            "search": be.search_args, "options": options}


class ShardIndex:
    """Top-k over one shard's embeddings [n, dim]: ``search(queries [t, dim], k) -> (ids, scores)``.

    ids [t, k'] int64 local positions (-1 pads), scores [t, k'] float32 exact
    (q.e for "ip", -|q-e|^2 for "l2"), in no particular order; k' <= k.
    """

    exact = True

    def __init__(self, embeddings: np.ndarray, metric: str):
        # a plain ndarray view of the memory map: numpy's memmap subclass costs ~0.5 ms per small matmul
        self.embeddings, self.metric = np.asarray(embeddings), metric
        self.size = int(embeddings.shape[0])
        self._sq = None

    def search(self, queries: np.ndarray, k: int):
        n = self.size
        if n == 0 or k == 0 or len(queries) == 0:
            return np.full((len(queries), 0), -1, np.int64), np.zeros((len(queries), 0), np.float32)
        sq = None
        if self.metric == "l2":
            if self._sq is None:
                e = np.asarray(self.embeddings)
                self._sq = np.einsum("nd,nd->n", e, e)[None]
            sq = self._sq
        weight, bias = column_transform(self.metric, sq)
        pos, ranked = blocked_topk(queries[None], self.embeddings[None], np.array([n]), k, weight, bias)
        return pos[0], scores_from_ranked(self.metric, ranked[0], queries)

    def to_bytes(self) -> bytes | None:
        return None


class AnnShardIndex(ShardIndex):
    """One core SegmentIndex (faiss / ScaNN / hnswlib) over the whole shard."""

    exact = False

    def __init__(self, embeddings, metric, resolved: dict, data: bytes | None = None):
        super().__init__(embeddings, metric)
        self.resolved = resolved
        cls = get_backend_class(resolved["backend"]).segment_index
        dim, span = int(embeddings.shape[1]), max(self.size, 1)
        if data is None:
            self.segment = cls(metric, dim, span, resolved["build"])
            self.segment.set_query_arguments(**resolved["search"])
            if self.size:
                self.segment.add(np.ascontiguousarray(embeddings, np.float32))
        else:
            try:
                self.segment = cls.deserialize(data, metric, dim, span, resolved["build"])
            except ValueError as e:
                raise ValueError(f"shard index is corrupt or does not match its shard: {e}") from None
            self.segment.set_query_arguments(**resolved["search"])

    def set_search_options(self, **options) -> None:
        """Change search options (nprobe, ef, reorder, ...), validated by the backend as ``Memory`` would."""
        be = _backend(self.resolved["type"], self.size, int(self.embeddings.shape[1]), self.metric,
                      {**self.resolved.get("options", {}), **options})
        self.resolved = {**self.resolved, "search": be.search_args, "options": {**self.resolved.get("options", {}), **options}}
        self.segment.set_query_arguments(**be.search_args)

    def search(self, queries, k):
        if self.size == 0 or not self.segment.ready():
            return ShardIndex.search(self, queries, k)
        k = min(k, self.size)
        found = self.segment.batch_query(np.ascontiguousarray(queries, np.float32), k)
        ids, scores = found if isinstance(found, tuple) else (found, None)
        ids = np.asarray(ids, np.int64)
        ids = np.where((ids >= 0) & (ids < self.size), ids, -1)
        if scores is None:            # compressed codes (PQ): re-score exactly from the embeddings
            cand = np.asarray(self.embeddings)[np.maximum(ids, 0)]
            scores = score_candidates(self.metric, queries, cand)
        return ids, np.where(ids >= 0, scores, -np.inf).astype(np.float32)

    def to_bytes(self):
        return self.segment.serialize()


def build_index(embeddings: np.ndarray, metric: str, resolved: dict) -> ShardIndex:
    if resolved["type"] == "exact":
        return ShardIndex(embeddings, metric)
    return AnnShardIndex(embeddings, metric, resolved)


def load_index(embeddings: np.ndarray, metric: str, resolved: dict, data: bytes | None) -> ShardIndex:
    if resolved["type"] == "exact":
        return ShardIndex(embeddings, metric)
    if data is None:
        raise ValueError(f"shard index of type {resolved['type']!r} has no index.bin")
    return AnnShardIndex(embeddings, metric, resolved, data)


def top_k_sorted(ids: np.ndarray, scores: np.ndarray, k: int):
    """The k best of candidates [t, m] (ids -1 are empty), sorted by score then id; padded with -1 / -inf."""
    t, m = ids.shape
    scores = np.where(ids >= 0, scores, -np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    ids, scores = np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)
    ids = np.where(np.isneginf(scores), -1, ids)
    if m < k:
        ids = np.concatenate([ids, np.full((t, k - m), -1, np.int64)], 1)
        scores = np.concatenate([scores, np.full((t, k - m), -np.inf, np.float32)], 1)
    return ids, scores.astype(np.float32)


def search_excluding(index: ShardIndex, queries: np.ndarray, k: int, lo: np.ndarray | None = None,
                     hi: np.ndarray | None = None, margin: int = DEFAULT_MARGIN):
    """Top-k of queries [t, dim] in one shard, none of them in the excluded id ranges.

    lo, hi: [t, m] int64 local id ranges [lo, hi) to exclude per query (disjoint; lo == hi excludes
    nothing). Returns ids [t, k] (-1 where fewer remain) and scores [t, k] (-inf there), sorted.
    """
    t, n = len(queries), index.size
    out_ids, out_scores = np.full((t, k), -1, np.int64), np.full((t, k), -np.inf, np.float32)
    if n == 0 or t == 0:
        return out_ids, out_scores
    if lo is None:
        lo = hi = np.zeros((t, 0), np.int64)
    banned = np.clip(np.minimum(hi, n) - np.clip(lo, 0, n), 0, None).sum(1)
    bound = np.minimum(n, k + banned)
    fetch = bound.copy() if index.exact else np.minimum(bound, k + margin)
    todo = np.arange(t)
    while todo.size:
        f = int(fetch[todo].max())
        ids, scores = index.search(queries[todo], f)
        ok = ids >= 0
        for j in range(lo.shape[1]):
            ok &= (ids < lo[todo, j:j + 1]) | (ids >= hi[todo, j:j + 1])
        exhausted = (ids >= 0).sum(1) < f            # the index has nothing more to give these queries
        done = (ok.sum(1) >= k) | (f >= bound[todo]) | exhausted
        top_ids, top_scores = top_k_sorted(np.where(ok, ids, -1)[done], scores[done], k)
        out_ids[todo[done]], out_scores[todo[done]] = top_ids, top_scores
        todo = todo[~done]
        fetch[todo] = np.minimum(bound[todo], 4 * f)
    return out_ids, out_scores
