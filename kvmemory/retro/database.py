"""RetroDatabase: a finished store, opened for queries.

Chunk ids are global: shard ``s``'s local id ``i`` is ``offsets[s] + i``, with
shards in manifest order. Document ids are global too (assigned at planning);
a document's chunks are one contiguous id range of one shard.

A query fans out to every shard index (its same-document filter applied
there, see :func:`kvmemory.retro.index.search_excluding`), and the shards'
top-k lists are merged into one top-k, sorted by score and then by id. The
true top k of the whole database is among the union of the shards' top k, so
with the exact index a sharded store answers exactly as one exact index over
all its chunks would.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from . import store as st
from .chunking import make_tokenizer
from .embedder import Embedder, embedder_from_fingerprint, make_embedder, same_embedder
from .index import DEFAULT_MARGIN, load_index, search_excluding, top_k_sorted


@dataclasses.dataclass
class SearchHits:
    """ids [n, k] int64 global chunk ids (-1 where masked), scores [n, k] float32 (0 there), mask [n, k]."""

    ids: np.ndarray
    scores: np.ndarray
    mask: np.ndarray


@dataclasses.dataclass
class Neighbours:
    """What RETRO reads for each query chunk: its k neighbours, each followed by its continuation.

    tokens      [n, k, 2 * chunk_len] neighbour chunk then the next chunk of its document (pad_id where absent)
    token_mask  [n, k, 2 * chunk_len] bool, True on real tokens
    ids         [n, k] int64 global chunk ids of the neighbours (-1 where masked)
    scores      [n, k] float32, higher is closer (0 where masked)
    mask        [n, k] bool, False for slots with no neighbour (too few chunks left after exclusion)
    doc_ids     [n, k] int64, the neighbours' documents (-1 where masked)
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    mask: np.ndarray
    doc_ids: np.ndarray


class Shard:
    """One shard's memory-mapped arrays and its index (loaded on first search)."""

    def __init__(self, store: str, entry: dict, metric: str, verify: bool):
        self.store, self.name, self.metric = store, entry["name"], metric
        meta = st.read_shard_meta(store, self.name)
        if meta is None:
            raise ValueError(f"shard {self.name!r} listed in the manifest of {store!r} is missing")
        counts = {k: entry.get(k) for k in ("docs", "chunks", "tokens")}
        if meta["counts"] != counts or meta.get("input_hash") != entry.get("input_hash") \
                or meta.get("first_doc") != entry.get("first_doc"):
            raise ValueError(f"shard {self.name!r} of {store!r} does not match the manifest "
                             f"(shard: {meta['counts']}, manifest: {counts})")
        self.meta = meta
        a = st.load_shard_arrays(store, self.name, meta, verify)
        self.tokens, self.lengths, self.doc_ids = a["tokens"], a["lengths"], a["doc_ids"]
        self.positions, self.embeddings, self.docs = a["positions"], a["embeddings"], a["docs"]
        self.first_doc, self.num_docs = entry["first_doc"], entry["docs"]
        if self.num_docs and not np.array_equal(np.asarray(self.docs[:, 0]),
                                                np.arange(self.first_doc, self.first_doc + self.num_docs)):
            raise ValueError(f"shard {self.name!r}: docs.npy does not hold documents {self.first_doc}.."
                             f"{self.first_doc + self.num_docs - 1}")
        self._index = None

    @property
    def size(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def index(self):
        if self._index is None:
            files = self.meta["files"]
            data = st.read_index_bytes(self.store, self.name) if "index.bin" in files else None
            self._index = load_index(self.embeddings, self.metric, self.meta["index"], data)
        return self._index

    def doc_range(self, doc_ids: np.ndarray):
        """Local chunk ranges [lo, hi) of global ``doc_ids`` (arrays); empty (0, 0) for docs not in this shard."""
        j = doc_ids - self.first_doc
        inside = (j >= 0) & (j < self.num_docs)
        jj = np.where(inside, j, 0)
        docs = np.asarray(self.docs)
        lo = np.where(inside, docs[jj, 1] if self.num_docs else 0, 0)
        hi = np.where(inside, lo + (docs[jj, 2] if self.num_docs else 0), 0)
        return lo.astype(np.int64), hi.astype(np.int64)


class RetroDatabase:
    """A retro store opened for queries (see :mod:`kvmemory.retro.store` for the layout).

    Args:
        path: the store directory.
        embedder: the embedder to embed text queries with; default: made from the name in the
            manifest (with ``embedder_options``, e.g. ``{"num_threads": 1}``). Refused if its
            fingerprint differs from the store's.
        verify: check every file's CRC-32 (reads everything once); sizes and headers are always checked.
        num_threads: threads fanning a search out over shards (default: all cores; ANN indices only,
            the exact search is one BLAS call per shard, multi-threaded already).
    """

    def __init__(self, path, embedder: Embedder | str | None = None, verify: bool = True,
                 num_threads: int | None = None, embedder_options: dict | None = None):
        self.path = os.fspath(path)
        m = st.read_manifest(self.path)
        if m["pending"]:
            raise ValueError(f"store {self.path!r} has an unfinished build ({len(m['pending'])} shards pending): "
                             "run the build again to resume it")
        self.manifest = m
        self.chunk_len, self.pad_id, self.metric = int(m["chunk_len"]), int(m["pad_id"]), m["metric"]
        self.tokenizer = make_tokenizer(m["tokenizer"]["name"]) if m["tokenizer"]["name"] == "bytes" else None
        self.index_type = m["index"]["type"]
        self.shards = [Shard(self.path, e, self.metric, verify) for e in m["shards"]]
        for s in self.shards:
            if not same_embedder(m["embedder"], s.meta["embedder"]):
                raise ValueError(f"shard {s.name!r} was embedded by {s.meta['embedder']['name']!r} "
                                 f"(hash {s.meta['embedder']['hash']}), the store by {m['embedder']['name']!r}")
        self.offsets = np.cumsum([0] + [s.size for s in self.shards]).astype(np.int64)
        self.first_docs = np.array([s.first_doc for s in self.shards], np.int64)
        self.dim = int(m["embedder"]["dim"])
        self._embedder = None
        self.embedder_options = dict(embedder_options or {})
        if embedder is not None:
            self.embedder = embedder
        self.num_threads = num_threads or os.cpu_count() or 1
        self._pool = None

    @classmethod
    def open(cls, path, **kwargs) -> "RetroDatabase":
        """Same as ``RetroDatabase(path, **kwargs)``."""
        return cls(path, **kwargs)

    # -- sizes ------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    def __len__(self) -> int:
        return self.num_chunks

    def __repr__(self) -> str:
        return (f"RetroDatabase({self.path!r}, chunks={self.num_chunks}, docs={self.num_docs}, "
                f"shards={len(self.shards)}, index={self.index_type!r}, embedder={self.manifest['embedder']['name']!r})")

    # -- the embedder ---------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self.embedder = embedder_from_fingerprint(self.manifest["embedder"], **self.embedder_options)
        return self._embedder

    @embedder.setter
    def embedder(self, embedder) -> None:
        embedder = make_embedder(embedder)
        fp, want = embedder.fingerprint(), self.manifest["embedder"]
        if not same_embedder(want, fp):
            raise ValueError(f"store {self.path!r} was built with embedder {want['name']!r} (dim {want['dim']}, "
                             f"config hash {want['hash']}); the embedder given is {fp['name']!r} (dim {fp['dim']}, "
                             f"config hash {fp['hash']}): its vectors would not be comparable")
        self._embedder = embedder

    def embed(self, queries) -> np.ndarray:
        """Embeddings [n, dim] of query texts (list of str) or chunk token arrays [n, <=chunk_len] / list of 1-D."""
        if isinstance(queries, str):
            queries = [queries]
        if isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.floating):
            return self._check_embeddings(queries)
        texts = [q if isinstance(q, str) else self._decode(q) for q in queries]
        return self.embedder.checked(texts) if texts else np.zeros((0, self.dim), np.float32)

    def _decode(self, tokens) -> str:
        if self.tokenizer is None:
            raise ValueError("token queries need the store's tokenizer; this store's is not built in: pass texts "
                             "or embeddings")
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"a token query must be a 1-D integer array, got {arr.dtype} {arr.shape}")
        return self.tokenizer.decode(arr)

    def _check_embeddings(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have shape [n, {self.dim}], got {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"query embeddings must have a float dtype, got {x.dtype}")
        x = np.ascontiguousarray(x, np.float32)
        if not np.isfinite(x).all():
            raise ValueError("query embeddings contain NaN or inf")
        return x

    def with_index(self, index: str, index_options: dict | None = None) -> dict:
        """Index every shard's embeddings with another index type, in memory, without re-embedding.

        For trying index types on a built store (the store on disk keeps its own index).
        Returns build seconds per shard.
        """
        import time
        from .index import build_index, resolve_options
        seconds = {}
        for s in self.shards:
            t = time.perf_counter()
            resolved = resolve_options(index, s.size, self.dim, self.metric, index_options)
            s._index = build_index(s.embeddings, self.metric, resolved)
            seconds[s.name] = time.perf_counter() - t
        self.index_type = index
        return seconds

    # -- search ------------------------------------------------------------------------------
    def _exclusions(self, exclude_doc_ids, n: int) -> np.ndarray:
        if exclude_doc_ids is None:
            return np.full((n, 0), -1, np.int64)
        ex = np.asarray(exclude_doc_ids)
        if ex.ndim == 1:
            ex = ex[:, None]
        if ex.ndim != 2 or ex.shape[0] != n or (ex.size and not np.issubdtype(ex.dtype, np.integer)):
            raise ValueError(f"exclude_doc_ids must be ints of shape [{n}] or [{n}, m] (-1: none), "
                             f"got {ex.dtype} {ex.shape}")
        if ex.size and ex.min() < -1:
            raise ValueError(f"exclude_doc_ids must be >= -1 (-1: exclude nothing), got {int(ex.min())}")
        return ex.astype(np.int64)

    def search(self, queries, k: int = 2, exclude_doc_ids=None, margin: int = DEFAULT_MARGIN) -> SearchHits:
        """Global ids and scores of the k nearest chunks of each query, none from its excluded documents.

        queries: embeddings [n, dim] float, texts, or chunk tokens (see ``embed``).
        exclude_doc_ids: [n] or [n, m] int document ids to leave out per query (-1: none); a document
            not in the database excludes nothing.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        q = self.embed(queries)
        n = len(q)
        ex = np.sort(self._exclusions(exclude_doc_ids, n), axis=1)
        ex[:, 1:][ex[:, 1:] == ex[:, :-1]] = -1          # a document named twice is excluded once

        def one(s: int):
            shard = self.shards[s]
            lo, hi = shard.doc_range(ex)
            ids, scores = search_excluding(shard.index, q, int(k), lo, hi, margin)
            return np.where(ids >= 0, ids + self.offsets[s], -1), scores

        parallel = len(self.shards) > 1 and self.num_threads > 1 and self.index_type != "exact"
        results = self._map(one, range(len(self.shards))) if parallel else [one(s) for s in range(len(self.shards))]
        if results:
            ids, scores = top_k_sorted(np.concatenate([r[0] for r in results], 1),
                                       np.concatenate([r[1] for r in results], 1), int(k))
        else:
            ids, scores = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
        mask = ids >= 0
        return SearchHits(ids, np.where(mask, scores, 0).astype(np.float32), mask)

    def _map(self, fn, items):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, "kvmemory-retro")
        return list(self._pool.map(fn, items))

    def neighbours(self, queries, k: int = 2, exclude_doc_ids=None, margin: int = DEFAULT_MARGIN) -> Neighbours:
        """RETRO's retrieval: for each query, k neighbours with their continuations (see :class:`Neighbours`)."""
        hits = self.search(queries, k, exclude_doc_ids, margin)
        tokens, token_mask = self.chunk_tokens(hits.ids, continuation=True)
        doc_ids = self.chunk_docs(hits.ids)[0]
        return Neighbours(tokens, token_mask, hits.ids, hits.scores, hits.mask, doc_ids)

    # -- chunks ---------------------------------------------------------------------------------
    def locate(self, ids) -> tuple:
        """(shard index, local id) arrays of global chunk ids (ValueError outside [0, num_chunks))."""
        ids = np.asarray(ids, np.int64)
        bad = ids[(ids < 0) | (ids >= self.num_chunks)]
        if bad.size:
            raise ValueError(f"chunk ids must be in [0, {self.num_chunks}), got {bad[:5].tolist()}")
        s = np.searchsorted(self.offsets, ids, side="right") - 1
        return s, ids - self.offsets[s]

    def _gather(self, ids, field: str, fill, width=None):
        ids = np.asarray(ids, np.int64)
        valid = ids >= 0
        sample = getattr(self.shards[0], field) if self.shards else np.zeros((0,) + ((width,) if width else ()))
        out = np.full(ids.shape + sample.shape[1:], fill, sample.dtype)
        if valid.any():
            s, local = self.locate(ids[valid])
            vals = np.empty((len(s),) + sample.shape[1:], sample.dtype)
            for si in np.unique(s):
                sel = s == si
                uniq, inverse = np.unique(local[sel], return_inverse=True)   # sorted reads of the memory map
                vals[sel] = np.asarray(getattr(self.shards[si], field)[uniq])[inverse]
            out[valid] = vals
        return out

    def chunk_docs(self, ids) -> tuple:
        """(doc_ids, positions) of chunk ids (any shape; -1 gives -1)."""
        return self._gather(ids, "doc_ids", -1), self._gather(ids, "positions", -1)

    def embeddings(self, ids) -> np.ndarray:
        """Stored embeddings [..., dim] of chunk ids (zeros for -1)."""
        return self._gather(ids, "embeddings", 0)

    def chunk_tokens(self, ids, continuation: bool = True) -> tuple:
        """Tokens [..., C] (or [..., 2C] with the continuation) and their mask, for chunk ids (-1: all pad)."""
        ids = np.asarray(ids, np.int64)
        C = self.chunk_len
        tokens = self._gather(ids, "tokens", self.pad_id)
        lengths = self._gather(ids, "lengths", 0)
        mask = np.arange(C) < lengths[..., None]
        if not continuation:
            return tokens, mask
        docs = self._gather(ids, "doc_ids", -1)
        nxt = np.where(ids >= 0, ids + 1, -1)
        nxt = np.where(nxt < self.num_chunks, nxt, -1)
        nxt = np.where((nxt >= 0) & (self._gather(nxt, "doc_ids", -2) == docs), nxt, -1)
        cont_tokens, cont_mask = self.chunk_tokens(nxt, continuation=False)
        return np.concatenate([tokens, cont_tokens], -1), np.concatenate([mask, cont_mask], -1)

    def text(self, chunk_id: int, continuation: bool = False) -> str:
        """The decoded text of one chunk (and its continuation)."""
        tokens, mask = self.chunk_tokens(np.array([chunk_id]), continuation)
        if self.tokenizer is None:
            raise ValueError("this store's tokenizer is not built in: decode the tokens yourself")
        return self.tokenizer.decode(tokens[0][mask[0]])

    # -- documents ------------------------------------------------------------------------------
    def doc_names(self) -> list:
        """Names of every document, by document id."""
        return [n for s in self.shards for n in st.read_doc_names(self.path, s.name)]

    def doc_chunks(self, doc_id: int) -> np.ndarray:
        """Global chunk ids of one document, in order (empty for an empty or unknown document)."""
        s = int(np.searchsorted(self.first_docs, doc_id, side="right") - 1)
        if s < 0:
            return np.zeros(0, np.int64)
        lo, hi = self.shards[s].doc_range(np.array([doc_id]))
        return np.arange(lo[0], hi[0], dtype=np.int64) + self.offsets[s]

    def info(self) -> dict:
        m = self.manifest
        return {"path": self.path, "chunks": self.num_chunks, "docs": self.num_docs, "shards": len(self.shards),
                "tokens": m["counts"]["tokens"], "chunk_len": self.chunk_len, "metric": self.metric,
                "index": m["index"], "embedder": {k: m["embedder"][k] for k in ("name", "dim", "hash")},
                "tokenizer": m["tokenizer"]}

