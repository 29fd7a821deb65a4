"""backend="scann": time segments indexed by ScaNN (brute force while small, then tree + AH + reorder).

Each (row, head, segment) gets one :class:`ScannSegmentIndex`. ScaNN's
builder trains on the data it is given, so an index grows in phases:

* below ``tree_min_size`` entries it is a ScaNN float32 brute-force searcher
  (exact; measured 2-3x faster single-threaded than the ring's numpy search at
  1k-8k entries), fed by ``upsert``;
* at ``tree_min_size`` entries it is rebuilt as tree + asymmetric hashing +
  exact reordering over everything it holds, and again whenever it has grown
  by ``rebuild_factor`` and once when the segment is full. Entries arriving
  between builds are ``upsert``-ed: assigned to the nearest trained leaf and
  hashed with the trained codebook. Builds happen at geometrically growing
  sizes, so a segment's total build work is a small multiple of one build
  over the full segment.

FIFO: ``removes`` is False. ScaNN's ``delete`` moves the last datapoint into
the deleted slot (positions would need a remap table) and leaves the trained
partitions stale anyway; the segmented layer already over-fetches the one
partly evicted segment by held/live, searches it exactly once it is less
than 1/4 live, and drops fully evicted segments whole, so deleting buys
nothing but cost.
"""

from __future__ import annotations

import ctypes
import io
import math
import mmap
import os
import re
import tempfile

import numpy as np
from scann.scann_ops.py import scann_ops_pybind as _sop

from .segment_index import SegmentIndex
from ..validation import check_int_option
from .segmented import SegmentedBackend

_DISTANCE = {"ip": "dot_product", "l2": "squared_l2"}
SCAN_PER_REORDER = 8   # a search covers leaves holding at least this many entries per reorder candidate
_AH_CLUSTERS = 16      # lut16 asymmetric hashing: AH training needs at least this many points
LOG_LEVEL_ENV = "KVMEMORY_SCANN_LOG_LEVEL"


def quiet_scann_logs(level: int | None = None) -> bool:
    """Set the minimum severity ScaNN's C++ code logs (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL); True if set.

    ScaNN logs through its own copy of absl, which reads neither
    TF_CPP_MIN_LOG_LEVEL nor GLOG_minloglevel and writes every INFO line
    (one or two per tree build) to stderr. Its extension exports
    ``absl::SetMinLogLevel``, called here through ctypes; the mangled name
    carries absl's versioned namespace, so it is looked up in the library
    file. Level: the argument, else $KVMEMORY_SCANN_LOG_LEVEL, else
    $TF_CPP_MIN_LOG_LEVEL, else 1 (warnings and errors still shown).
    Returns False (and changes nothing) if the symbol is not found.
    """
    if level is None:
        env = os.environ.get(LOG_LEVEL_ENV, os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1"))
        try:
            level = int(env)
        except ValueError:
            raise ValueError(f"{LOG_LEVEL_ENV} must be an integer 0-3, got {env!r}") from None
    if not 0 <= level <= 3:
        raise ValueError(f"ScaNN log level must be 0-3 (INFO, WARNING, ERROR, FATAL), got {level}")
    path = getattr(_sop.scann_pybind, "__file__", None)
    if not path:
        return False
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            found = re.search(rb"_ZN4absl(?:\d+lts_\w+?)?14SetMinLogLevelENS\w*?18LogSeverityAtLeastE", data)
            name = found and bytes(found.group(0)).decode()
        if not name:
            return False
        setter = getattr(ctypes.CDLL(path), name)
    except (OSError, AttributeError, ValueError):
        return False
    setter.argtypes, setter.restype = [ctypes.c_int], None
    setter(level)
    return True


quiet_scann_logs()


def _leaves(build: dict, n: int, span: int) -> int:
    """Leaves of a tree built over n entries: num_leaves scaled like sqrt(n) from the full segment."""
    return max(1, min(n // _AH_CLUSTERS, round(build["num_leaves"] * math.sqrt(n / span))))


class ScannSegmentIndex(SegmentIndex):
    """One segment of one (row, head): a ScaNN searcher over local positions 0..n-1."""

    removes = False
    parallel = True

    def __init__(self, metric, dim, span, build):
        super().__init__(metric, dim, span, build)
        self.keys = np.zeros((0, dim), np.float32)   # rows [0, n) are live; dropped once a full segment is built
        self.n = 0
        self.built = 0          # entries covered by the last tree build (0: brute force)
        self.leaves = 0         # leaves of that tree
        self.searcher = None
        self.threads = 1        # size of the searcher's thread pool (it starts with none)
        self.search = {}

    # -- building ---------------------------------------------------------------
    def _create(self, config: str, keys: np.ndarray):
        searcher = _sop.create_searcher(keys, config, 1)
        searcher.set_num_threads(1)
        self.threads = 1
        return searcher

    def _build(self) -> None:
        b, n, keys = self.build, self.n, self.keys[:self.n]
        builder = _sop.builder(keys, 10, _DISTANCE[self.metric])
        if n < max(b["tree_min_size"], 2 * _AH_CLUSTERS):
            self.searcher = self._create(builder.score_brute_force().create_config(), keys)
            return
        self.leaves = _leaves(b, n, self.span)
        aqt = b["anisotropic_quantization_threshold"]
        config = (builder
                  .tree(self.leaves, self.leaves, training_sample_size=min(n, b["training_sample_size"]))
                  .score_ah(b["dimensions_per_block"],
                            anisotropic_quantization_threshold=float("nan") if aqt is None else aqt,
                            training_sample_size=min(n, b["hash_training_sample_size"]))
                  .reorder(100).create_config())
        self.searcher = self._create(config, keys)
        self.built = n

    def add(self, keys: np.ndarray) -> None:
        m, n = len(keys), self.n + len(keys)
        if n > len(self.keys):
            grown = np.zeros((min(self.span, max(n, 2 * len(self.keys))), self.dim), np.float32)
            grown[:self.n] = self.keys[:self.n]
            self.keys = grown
        self.keys[self.n:n] = keys
        self.n = n
        b = self.build
        tree_due = n >= b["tree_min_size"] and n >= 2 * _AH_CLUSTERS and (
            self.built == 0 or n >= b["rebuild_factor"] * self.built or (n == self.span and n > self.built))
        if self.searcher is None or tree_due:
            self._build()
        else:
            self.searcher.searcher.upsert([None] * m, list(keys), 1)
        if n == self.span:
            self.keys = None     # sealed: never rebuilt again; ScaNN keeps its own float32 copy

    # -- search -------------------------------------------------------------------
    def ready(self) -> bool:
        return self.searcher is not None

    def set_query_arguments(self, **search) -> None:
        self.search = search

    def batch_query(self, queries: np.ndarray, k: int, threads: int = 1):
        reorder = leaves = None
        if self.built:
            L, reorder = self.leaves, max(k, self.search["reorder"])
            # the same fraction of leaves as a full segment, and enough to hold ~8 * reorder entries on average
            leaves = max(math.ceil(self.search["num_leaves_to_search"] * L / self.build["num_leaves"]),
                         math.ceil(SCAN_PER_REORDER * reorder * L / self.n))
            leaves = min(L, leaves)
        if threads > 1:
            # only searches with fewer indices than threads get here, so few searchers ever hold a pool
            if threads != self.threads:
                self.searcher.set_num_threads(threads)
                self.threads = threads
            ids, dist = self.searcher.search_batched_parallel(queries, k, reorder, leaves)
        else:
            ids, dist = self.searcher.search_batched(queries, k, reorder, leaves)
        ids = ids.astype(np.int64)
        # ScaNN pads with id 0 and NaN distance when it finds fewer than k
        ids = np.where(np.isfinite(dist) & (ids < self.n), ids, -1)
        # brute force and the exact reordering stage score in float32: squared l2 distances or dot products
        scores = np.where(ids >= 0, -dist if self.metric == "l2" else dist, -np.inf)
        if ids.shape[1] < k:
            pad = ((0, 0), (0, k - ids.shape[1]))
            ids, scores = np.pad(ids, pad, constant_values=-1), np.pad(scores, pad, constant_values=-np.inf)
        return ids[:, :k], scores[:, :k]

    # -- persistence ------------------------------------------------------------------
    def serialize(self) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = os.path.abspath(tmp)
            files = {}
            if self.searcher is not None:
                self.searcher.serialize(tmp, True)
                files = {name: np.fromfile(os.path.join(tmp, name), np.uint8) for name in os.listdir(tmp)}
        meta = np.array([self.n, self.built, self.leaves], np.int64)
        arrays = {f"scann/{name}": data for name, data in files.items()}
        if self.keys is not None:
            arrays["keys"] = self.keys[:self.n]
        buf = io.BytesIO()
        np.savez(buf, meta=meta, **arrays)
        return buf.getvalue()

    @classmethod
    def deserialize(cls, data, metric, dim, span, build):
        index = cls(metric, dim, span, build)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                n, index.built, index.leaves = (int(v) for v in z["meta"])
                keys = z["keys"] if "keys" in z.files else None
                files = {name[len("scann/"):]: z[name] for name in z.files if name.startswith("scann/")}
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise ValueError(f"not a serialized ScaNN segment index: {e}") from e
        if keys is not None and keys.shape != (n, dim):
            raise ValueError(f"saved ScaNN segment keys have shape {keys.shape}, expected {(n, dim)}")
        if not 0 <= n <= span or (keys is None and n != span) or (n and not files):
            raise ValueError(f"inconsistent saved ScaNN segment index (n={n}, built={index.built}, span={span})")
        index.n, index.keys = n, None if keys is None else np.array(keys, np.float32)
        if files:
            for name in files:
                if os.path.basename(name) != name or name.startswith(".") or name.endswith(".pkl"):
                    raise ValueError(f"unexpected file {name!r} in a saved ScaNN segment index")
            try:
                index.searcher = cls._load_searcher(files)
                size = index.searcher.size()
            except Exception as e:      # missing/corrupt assets: OSError, RuntimeError, UnicodeDecodeError, ...
                raise ValueError(f"saved scann index is corrupt: {type(e).__name__}: {e}") from e
            if size != n:
                raise ValueError(f"saved scann index is corrupt: its searcher holds {size} entries, expected {n}")
        return index

    @staticmethod
    def _load_searcher(files: dict):
        """A one-thread ScannSearcher rebuilt from its serialized files {name: uint8 array}."""
        with tempfile.TemporaryDirectory() as tmp:
            tmp = os.path.abspath(tmp)
            for name, content in files.items():
                np.asarray(content, np.uint8).tofile(os.path.join(tmp, name))
            with open(os.path.join(tmp, "scann_assets.pbtxt"), encoding="utf-8") as f:
                assets = f.read()
            # every asset must be one of the files just written: a crafted path could read any file
            for path in re.findall(r'asset_path:\s*"([^"]*)"', assets):
                if path not in files:
                    raise ValueError(f"asset path {path!r} is not one of the saved files")
            # not load_searcher: it would unpickle a scann_docids.pkl
            searcher = _sop.ScannSearcher(_sop.scann_pybind.ScannNumpy(tmp, assets))
        searcher.set_num_threads(1)
        return searcher


class ScannBackend(SegmentedBackend):
    """Segments searched by ScaNN: brute force while small, then tree + asymmetric hashing + reorder.

    Build options (besides segment_size, exact_below, num_threads; see SegmentedBackend):
        num_leaves: tree leaves of a full segment (default round(sqrt(segment_size)));
            an index built over n < segment_size entries gets num_leaves * sqrt(n / segment_size).
        tree_min_size: entries a segment's index holds before its first tree build; below it
            the index is ScaNN brute force, which is exact (default 4096).
        rebuild_factor: rebuild the tree when the index has grown by this factor since its last
            build (and once when the segment is full); float > 1 (default 2.0).
        dimensions_per_block: key dimensions per asymmetric-hashing block, 16 centers each
            (default 2; 4 builds and searches faster at lower recall).
        anisotropic_quantization_threshold: ScaNN's anisotropic (noise-shaping) threshold for
            "ip"/"cosine", e.g. 0.2; None disables it (default None: slower builds, no recall
            gain measured once results are reordered).
        training_sample_size: entries sampled to train the tree (k-means) (default 65536).
        hash_training_sample_size: entries sampled to train the AH codebooks (default 1024;
            4096 measured 1.7x slower adds, same recall after reordering).

    Search options (``Memory.set_search_options``; None restores the default):
        num_leaves_to_search: leaves searched per query in a full segment's tree; smaller trees
            search the same fraction, and every tree at least enough leaves to hold ~8 * reorder
            entries on average (default ceil(num_leaves / 8)). Recall@32 on MiniLM keys, 16384-entry
            segment: 1/8 of the leaves 0.96-0.98; 8192-entry segment: 0.71 at 1/8, 0.90 at 1/4.
        reorder: candidates per query re-scored exactly in float32 after AH scoring; at least
            k is used (default 256).
    """

    name = "scann"
    segment_index = ScannSegmentIndex
    build_options = {
        **SegmentedBackend.build_options,
        "num_leaves": None,
        "tree_min_size": 4096,
        "rebuild_factor": 2.0,
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": None,
        "training_sample_size": 65536,
        "hash_training_sample_size": 1024,
    }
    search_options = {"num_leaves_to_search": None, "reorder": 256}

    def __init__(self, config, **options):
        super().__init__(config, **options)
        o, S = self.options, self.options["segment_size"]
        if o["num_leaves"] is None:
            o["num_leaves"] = max(1, round(math.sqrt(S)))
        for name in ("num_leaves", "tree_min_size", "training_sample_size", "hash_training_sample_size",
                     "dimensions_per_block"):
            o[name] = check_int_option(name, o[name])     # python ints: numpy ints would break Memory.save
        if o["dimensions_per_block"] > config.key_dim:
            raise ValueError(f"dimensions_per_block must be <= key_dim ({config.key_dim}), "
                             f"got {o['dimensions_per_block']}")
        factor = o["rebuild_factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1 or not math.isfinite(factor):
            raise ValueError(f"rebuild_factor must be a finite number > 1, got {factor!r}")
        o["rebuild_factor"] = float(factor)
        aqt = o["anisotropic_quantization_threshold"]
        if aqt is not None:
            if isinstance(aqt, bool) or not isinstance(aqt, (int, float)) or not 0 < aqt < math.inf:
                raise ValueError(f"anisotropic_quantization_threshold must be None or a number > 0, got {aqt!r}")
            if config.metric == "l2":
                raise ValueError("anisotropic_quantization_threshold applies to metric 'ip'/'cosine', not 'l2'")
            o["anisotropic_quantization_threshold"] = float(aqt)
        self.library_build = {k: v for k, v in o.items() if k not in self.common_build_options}
        self.search_args = self.check_search_options(self.search_args)

    def check_search_options(self, options: dict) -> dict:
        """The search options as python ints; None means the default."""
        defaults = {"num_leaves_to_search": math.ceil(self.options["num_leaves"] / 8),
                    "reorder": self.search_options["reorder"]}
        return {k: check_int_option(k, defaults[k] if v is None else v) for k, v in options.items()}
