"""backend="faiss": time-segmented faiss indices (flat, IVF, HNSW or any index_factory string).

Each (row, head, segment) gets its own faiss index over at most
``segment_size`` keys (see :mod:`kvmemory.backends.segmented`). Evicted
entries are never physically removed: flat and IVF indices exclude them at
search time with an ``IDSelectorRange`` (O(1) per eviction), the others are
over-fetched and filtered by the segmented layer. Index "hnsw" with inner
product (and cosine) holds centred keys, as the hnsw backend does (see
:class:`FaissSegmentIndex`).
"""

from __future__ import annotations

import math
import struct
import threading

import faiss
import numpy as np

from .segment_index import SegmentIndex
from ..validation import check_int_option
from .segmented import SegmentedBackend

KINDS = ("flat", "ivf", "hnsw")
DEVICES = ("auto", "cpu", "cuda")
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_TRAINED, _PENDING, _FAILED = 0, 1, 2     # serialized state of a segment index
_MAGIC = b"KVFAIS2\0"
_HEADER = struct.Struct("<8sqqqq")         # magic, state, count, removed, centred (then centre [dim] <f4 if 1)
_HEADER_V1 = struct.Struct("<qqq")         # version 1: state, count, removed; never centred
CENTRE_SAMPLE = 512                       # keys averaged into the centre of a "hnsw" "ip" segment
_gpu = {}                                 # lazily made StandardGpuResources and the lock serialising its use
_gpu_init_lock = threading.Lock()         # guards the lazy creation of _gpu


def has_gpu() -> bool:
    """True if this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_resources():
    """The shared StandardGpuResources and the lock every call into a GPU index must hold."""
    with _gpu_init_lock:                  # two threads' first GPU segments must not make two resources
        if not _gpu:
            res, lock = faiss.StandardGpuResources(), threading.Lock()
            _gpu["res"], _gpu["lock"] = res, lock
        return _gpu["res"], _gpu["lock"]


def default_nlist(span: int) -> int:
    """IVF lists for a segment of ``span`` keys: ~4 sqrt(span), at least 39 keys per list."""
    return max(1, min(round(4 * math.sqrt(span)), span // 39))


def default_nprobe(nlist: int) -> int:
    """IVF lists scanned per query: ~3 sqrt(nlist), at least 16 (recall@32 ~0.94 on MiniLM attention keys)."""
    return min(nlist, max(16, round(3 * math.sqrt(nlist))))


def factory_string(build: dict) -> str:
    kind = build["index"]
    return {"flat": "Flat", "ivf": f"IVF{build['nlist']},Flat", "hnsw": f"HNSW{build['M']},Flat"}.get(kind, kind)


def make_index(metric: str, dim: int, build: dict):
    """A new CPU faiss index for the build options; ValueError naming ``index`` if faiss rejects it."""
    try:
        index = faiss.index_factory(dim, factory_string(build), _METRICS[metric])
    except RuntimeError as e:
        raise ValueError(f"index={build['index']!r} is not a valid faiss index_factory string: "
                         f"{str(e).splitlines()[-1]}") from None
    _check_plain_add(index, build["index"])
    hnsw = faiss.downcast_index(index)
    if isinstance(hnsw, faiss.IndexHNSW):
        hnsw.hnsw.efConstruction = build["ef_construction"]
    return index


def _check_plain_add(index, name) -> None:
    """ValueError naming ``index`` if the index (or one it wraps) is an IDMap, whose add() always fails.

    IndexIDMap/IndexIDMap2 only accept add_with_ids; this backend relies on faiss' sequential ids.
    """
    while index is not None:
        index = faiss.downcast_index(index)
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            raise ValueError(f"index={name!r} builds a faiss {type(index).__name__}, which only supports "
                             f"add_with_ids; kvmemory adds without ids: drop the IDMap/IDMap2 prefix")
        if isinstance(index, faiss.IndexPreTransform):
            index = index.index
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        else:
            index = None


def centres(metric: str, build: dict) -> bool:
    """True if a segment index stores centred keys (see :class:`FaissSegmentIndex`): "hnsw" with "ip"."""
    return metric == "ip" and build["index"] == "hnsw"


def _read_header(data: bytes, metric: str, dim: int, build: dict):
    """(state, count, removed, centre [dim] float32 or None, body) of a serialized segment index.

    Also reads version 1 (no magic, never centred): a trained "hnsw" "ip"
    index from it stays uncentred (exact scores, lower recall).
    """
    header = _HEADER if data.startswith(_MAGIC) else _HEADER_V1
    if len(data) < header.size:
        raise ValueError(f"saved faiss segment index is truncated ({len(data)} bytes)")
    if header is _HEADER_V1:
        return (*_HEADER_V1.unpack_from(data), None, data[header.size:])
    _, state, count, removed, centred = _HEADER.unpack_from(data)
    expected = int(state == _TRAINED and centres(metric, build))
    if centred != expected:
        raise ValueError(f"saved faiss segment index has centred={centred}, expected {expected} "
                         f"for index {build['index']!r}, metric {metric!r}, state {state}")
    end = header.size + 4 * dim * centred
    if len(data) < end:
        raise ValueError(f"saved faiss segment index is truncated ({len(data)} bytes)")
    centre = np.frombuffer(data, "<f4", dim, header.size).astype(np.float32) if centred else None
    if centred and not np.isfinite(centre).all():
        raise ValueError("saved faiss segment index has a non-finite centre")
    return state, count, removed, centre, data[end:]


def _omp(fn, *args, threads: int = 1):
    """fn(*args) with ``threads`` OpenMP threads; the setting is per calling thread, so other threads are unaffected."""
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        faiss.omp_set_num_threads(prev)


class FaissSegmentIndex(SegmentIndex):
    """One faiss index over one segment; keys are buffered until a trainable index is trained.

    index="hnsw" with metric "ip" (cosine arrives as "ip" over unit vectors)
    stores centred keys ``k - c``, for the reason given (and measured) in
    :class:`kvmemory.backends.hnsw.HnswSegmentIndex`: inner-product HNSW
    graphs navigate badly when keys share a strong common direction, and
    ``q.(k - c) = q.k - q.c`` ranks exactly like ``q.k``. Keys are buffered
    like an untrained index's (``ready()`` is False meanwhile, so the segment
    is searched exactly) until min(span, ``CENTRE_SAMPLE``) are in; ``c`` [dim]
    is the mean of the buffered keys (including all of the add that crossed
    that count), then the centred keys are added. Searches return exact scores
    ``q.(k - c) + q.c``. On MiniLM attention keys (capacity 65536, two
    segments of 32768) this took recall@32 at the default ef_search 64 from
    0.80 to 0.99. Factory strings ("HNSW32,Flat") and metric "l2" (translation
    invariant) are not centred.
    """

    def __init__(self, metric, dim, span, build, index=None):
        super().__init__(metric, dim, span, build)
        self.index = make_index(metric, dim, build) if index is None else index
        self.gpu = build.get("device") == "cuda"
        self.removes = build["index"] in ("flat", "ivf") and not self.gpu
        self.parallel = not self.gpu       # a GPU index is searched under its lock anyway
        self.count = self.removed = 0
        self.centres = centres(metric, build)
        self.centre = None                 # [dim] float32 subtracted from every key added; None: no centring
        self.state = _TRAINED if self.index.is_trained and not self.centres else _PENDING
        self.pending = []                  # keys [n, dim] awaiting training (or the centre)
        # IVF trains once it holds 39 keys per list (faiss' recommended minimum) or a full segment, other
        # trainable indices on a full segment. With the default nlist that is 39 * (span // 39) ~ a full
        # segment for span <= 24336, else 156 sqrt(span) keys (86% of a 32768 segment, 61% of 65536).
        self.train_at = (min(span, 39 * build["nlist"]) if build["index"] == "ivf"
                         else min(span, CENTRE_SAMPLE) if self.centres else span)
        self.params = self.sel = self.lock = None    # lock: the GPU lock, set by _to_gpu
        self.search_args = {}
        if self.gpu and self.state == _TRAINED:
            self._to_gpu()

    def _to_gpu(self):
        res, self.lock = _gpu_resources()
        with self.lock:
            self.index = faiss.index_cpu_to_gpu(res, 0, self.index)

    def add(self, keys):
        self.count += len(keys)
        if self.state == _TRAINED:
            self._add(keys)
        elif self.state == _PENDING:
            self.pending.append(keys)
            if self.count >= self.train_at:
                self._train()

    def _train(self):
        """Train on the buffered keys [n, dim] (and fix the centre from them), then add them."""
        keys, self.pending = np.concatenate(self.pending), []
        try:
            _omp(self.index.train, keys)
        except RuntimeError:               # too few keys for nlist / the codebooks: stay exact
            self.state, self.index = _FAILED, None
            return
        self.state = _TRAINED
        if self.centres:
            self.centre = keys.mean(0, dtype=np.float64).astype(np.float32)
        if self.gpu:
            self._to_gpu()
        self._add(keys)
        self._update_params()

    def _add(self, keys):
        # nothing is ever physically removed, so faiss' sequential ids are our local positions
        if self.centre is not None:
            keys = keys - self.centre
        if self.gpu:
            with self.lock:
                self.index.add(keys)
        else:
            _omp(self.index.add, keys)

    def ready(self):
        return self.state == _TRAINED

    def remove_below(self, position):
        self.removed = position
        self._update_params()

    def set_query_arguments(self, **search):
        self.search_args = search
        self._update_params()

    def _update_params(self):
        """Search parameters (and the selector hiding removed positions) passed to every search."""
        if self.state != _TRAINED:
            return
        nprobe, ef = self.search_args.get("nprobe"), self.search_args.get("ef_search")
        kind = self.build["index"]
        if self.gpu or kind not in KINDS:   # composite indices: set attributes wherever they apply
            space = faiss.GpuParameterSpace() if self.gpu else faiss.ParameterSpace()
            for name, value in (("nprobe", nprobe), ("efSearch", ef)):
                if value is None:
                    continue
                try:
                    if self.gpu:           # a GPU index is shared with searching threads
                        with self.lock:
                            space.set_index_parameter(self.index, name, value)
                    else:
                        space.set_index_parameter(self.index, name, value)
                except RuntimeError:       # the index has no such parameter
                    pass
            return
        if kind == "hnsw":
            self.params = faiss.SearchParametersHNSW(efSearch=ef) if ef else None
            return
        self.sel = faiss.IDSelectorRange(self.removed, 1 << 62) if self.removed else None
        if kind == "ivf":
            self.params = faiss.SearchParametersIVF(sel=self.sel, nprobe=nprobe or self.index.nprobe)
        else:
            self.params = faiss.SearchParameters(sel=self.sel) if self.sel is not None else None

    def batch_query(self, queries, k, threads=1):
        if self.gpu:
            with self.lock:
                dist, ids = self.index.search(queries, k)
        else:
            dist, ids = _omp(lambda: self.index.search(queries, k, params=self.params), threads=threads)
        # flat storage (the named kinds) scores exactly on the CPU; factory strings may compress (PQ, SQ, ...),
        # and GPU kernels may compute in reduced precision (TF32): those are re-scored from the stored keys
        if self.build["index"] not in KINDS or self.gpu:
            return ids, None
        if self.centre is not None:        # the index holds k - c: q.k = q.(k - c) + q.c
            dist = dist + queries @ self.centre[:, None]
        return ids, (-dist if self.metric == "l2" else dist)

    def serialize(self):
        """Header (magic, state, count, removed, centred) + centre [dim] <f4 if centred + body.

        The body is faiss' own serialization once trained, else the buffered keys [count, dim] float32.
        """
        centred = self.centre is not None
        head = _HEADER.pack(_MAGIC, self.state, self.count, self.removed, int(centred))
        if centred:
            head += self.centre.astype("<f4").tobytes()
        if self.state == _TRAINED:
            if self.gpu:
                with self.lock:
                    index = faiss.index_gpu_to_cpu(self.index)
            else:
                index = self.index
            body = faiss.serialize_index(index).tobytes()
        elif self.state == _PENDING:
            body = np.concatenate(self.pending or [np.zeros((0, self.dim), np.float32)]).tobytes()
        else:
            body = b""
        return head + body

    @classmethod
    def deserialize(cls, data, metric, dim, span, build):
        state, count, removed, centre, body = _read_header(data, metric, dim, build)
        index = None
        if not 0 <= removed <= count <= span:
            raise ValueError(f"saved faiss segment index has {count} keys, {removed} removed, "
                             f"which does not fit a segment of {span}")
        if state == _TRAINED:
            try:
                index = faiss.deserialize_index(np.frombuffer(body, np.uint8))
            except RuntimeError as e:
                raise ValueError(f"saved faiss index is unreadable: {str(e).splitlines()[-1]}") from None
            if index.d != dim or index.ntotal != count or not index.is_trained:
                raise ValueError(f"saved faiss index has dim {index.d} and {index.ntotal} keys "
                                 f"(trained: {index.is_trained}), expected a trained index of dim {dim} "
                                 f"with {count} keys")
        elif state == _PENDING:
            # every saved key is at a local position: a missing or extra one would shift the later ones
            if len(body) != 4 * dim * count:
                raise ValueError(f"saved faiss segment buffer holds {len(body) / (4 * dim):g} keys of dim {dim}, "
                                 f"expected {count}")
        elif state == _FAILED:
            if body:
                raise ValueError(f"saved faiss segment index in the untrainable state has {len(body)} "
                                 "unexpected bytes")
        else:
            raise ValueError(f"saved faiss segment index has unknown state {state}")
        self = cls(metric, dim, span, build, index)
        self.count, self.removed, self.state, self.centre = count, removed, state, centre
        if state == _PENDING:
            self.pending = [np.frombuffer(body, np.float32).reshape(count, dim).copy()] if count else []
        elif state == _FAILED:
            self.index = None
        self._update_params()
        return self


class FaissBackend(SegmentedBackend):
    """Approximate top-k with faiss, one index per (row, head, segment).

    Build options (besides segment_size, exact_below and num_threads of
    :class:`~kvmemory.backends.segmented.SegmentedBackend`):
        index: "ivf" (IndexIVFFlat, the default), "flat" (exact IndexFlatIP/L2),
            "hnsw" (IndexHNSWFlat), or any faiss index_factory string such as
            "IVF256,PQ16x4fs" or "HNSW32,Flat" (not "IDMap..."/"IDMap2...":
            they only accept add_with_ids). An index that needs training
            buffers its segment's keys until it has enough ("ivf":
            min(segment_size, 39 * nlist); factory strings: a full segment),
            then trains on them; until then, or for good if training fails
            (e.g. fewer keys than lists), the segment is searched exactly.
            With the default nlist, "ivf" trains when its segment is full (to
            within 38 keys) for segment_size <= 24336, else at
            156 sqrt(segment_size) keys: 86% full at segment_size 32768 (the
            default for capacity 65536), 61% at 65536. Training earlier was
            measured to cost recall (MiniLM keys, capacity 65536, recall@32 vs
            exact: 16 keys per list 0.969-0.971, nlist 362 0.974-0.981, the
            default 0.983-0.989), so the newest segment is searched exactly
            for most of its filling.
            Evicted entries are hidden by an id selector for "flat" and "ivf"
            on CPU; other indices are over-fetched and filtered.
            "hnsw" with metric "ip" or "cosine" buffers each segment's first
            min(segment_size, 512) keys (searched exactly meanwhile), then
            stores keys minus their mean: same ranking, far better graph
            navigation on keys sharing a common direction (MiniLM attention
            keys, capacity 65536: recall@32 at ef_search 64 0.80 -> 0.99; see
            :class:`FaissSegmentIndex`).
        nlist: IVF lists per segment, for index="ivf" (default
            ``default_nlist(segment_size)``: ~4 sqrt(segment_size), >= 39 keys per list).
        M: HNSW links per node, for index="hnsw" (default 32, >= 2).
        ef_construction: HNSW build beam, for any top-level HNSW index (default 40).
        device: "auto" (the default: GPU if faiss has GPU support and sees a
            GPU, else CPU), "cpu" or "cuda" (ValueError without GPU support).
            "hnsw" has no faiss GPU version: "auto" keeps it on the CPU. GPU
            indices are trained on the CPU, and calls into them are serialised
            (one StandardGpuResources for all).

    Search options (``Memory.set_search_options``; None restores the default):
        nprobe: IVF lists scanned per query, for any IVF index (default
            ``default_nprobe(nlist)``: ~3 sqrt(nlist), at least 16).
        ef_search: HNSW search beam, for any HNSW index (default 64; faiss
            uses max(ef_search, k)).

    Threads: searches run on the segmented layer's pool of ``num_threads``,
    one task per (row, head, segment[, query chunk]). Every faiss call (search,
    add, train) runs with one OpenMP thread: ``omp_set_num_threads(1)`` around
    the call, restored after. OpenMP keeps that setting per calling thread, so
    no other thread, nor the caller's own faiss use, is affected, and the pool
    is never oversubscribed. (faiss' own OpenMP teams spin-wait: with 2
    threads on 2 busy cores, IVF training measured 3-4x slower than with 1.)
    """

    name = "faiss"
    segment_index = FaissSegmentIndex
    build_options = {**SegmentedBackend.build_options, "index": "ivf", "nlist": None, "M": 32,
                     "ef_construction": 40, "device": "auto"}
    search_options = {"nprobe": None, "ef_search": None}

    def __init__(self, config, **options):
        super().__init__(config, **options)
        o = self.options
        if not isinstance(o["index"], str):
            raise ValueError(f"index must be one of {KINDS} or a faiss index_factory string, got {o['index']!r}")
        if o["nlist"] is None:
            o["nlist"] = default_nlist(o["segment_size"])
        o["nlist"] = check_int_option("nlist", o["nlist"])
        o["M"] = check_int_option("M", o["M"])
        if o["M"] < 2:
            raise ValueError(f"M must be an int >= 2, got {o['M']!r}")
        o["ef_construction"] = check_int_option("ef_construction", o["ef_construction"])
        if o["device"] not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {o['device']!r}")
        make_index(self.index_metric, config.key_dim, o)          # reject a bad factory string now
        self.device = self._resolve_device(o["device"], o["index"])
        self.library_build = {**{k: o[k] for k in ("index", "nlist", "M", "ef_construction")},
                              "device": self.device}
        self.search_args = self.check_search_options(self.search_args)

    def _resolve_device(self, device: str, kind: str) -> str:
        if device == "cpu" or (device == "auto" and (kind == "hnsw" or not has_gpu())):
            return "cpu"
        if not has_gpu():
            raise ValueError("device='cuda' needs faiss with GPU support (faiss-gpu) and a visible GPU; "
                             "this faiss has none: use device='cpu' or 'auto'")
        if kind == "hnsw":
            raise ValueError("index='hnsw' has no faiss GPU implementation: use device='cpu' or index='ivf'")
        return "cuda"

    def check_search_options(self, options: dict) -> dict:
        defaults = {"nprobe": default_nprobe(self.options["nlist"]), "ef_search": 64}
        return {k: check_int_option(k, defaults[k] if v is None else v) for k, v in options.items()}
