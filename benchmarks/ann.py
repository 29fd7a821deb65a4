"""Recall vs. speed of every installed kvmemory backend, ann-benchmarks style (issue 3).

    python -m benchmarks.ann                    # sweep at capacity 65,536 (a few minutes on 2 cores)
    python -m benchmarks.ann --small            # smoke run: capacity 8,192, 128 queries
    python -m benchmarks.ann --full             # sweep at capacity 262,144 (the issue's headline)
    python -m benchmarks.ann churn              # add 4x capacity vs a fresh memory of the same content
    python -m benchmarks.ann overhead           # kvmemory vs the library called directly
    python -m benchmarks.ann speedup            # best approximate QPS at recall >= 0.9 vs exact, at 262,144

Every run is one memory of one row and one head (``Memory(batch_size=1,
num_heads=1, capacity=N, key_dim=64)``), filled by adds of ``--chunk`` (512)
tokens (add throughput is measured), then searched with ``--queries`` (512)
queries at ``-k`` (32): queries/s is the median of ``--repeats`` timed searches
after one warm-up. Recall@k is measured against ``backend="exact"`` on the
same content with ann-benchmarks' definition: a returned entry counts if its
true score is within 1e-3 of the k-th best true score (ties count, masked
slots do not).

Backends are driven through small adapters (:class:`Adapter`): a name, the
build options, and the list of search-option settings to sweep with
``Memory.set_search_options``. Their values come from :data:`SWEEPS`; an
option a backend class does not declare (in its ``build_options`` /
``search_options``) is dropped with a warning, so the harness never needs
to special-case a library, and a backend whose module fails to import is
skipped with its error.

Modes:
  sweep     recall vs QPS curve per backend at --capacity; writes
            results/ann_sweep.json and results/ann_recall_qps.png.
  churn     add 4x capacity (FIFO evicts 3/4), then compare add throughput
            (after the memory is full) and recall at default search options
            with a fresh memory holding the same final content. Target: churned
            within 20% of fresh (ratios >= 0.8; above 1 is fine).
  overhead  each approximate backend at its default options, but with one
            segment (segment_size = capacity, so one index as the direct call
            builds), vs calling its library directly on the same keys, queries
            and options, through benchmarks/direct/<lib>_direct.py ``build``.
            Like for like: ``with_entries=False`` searches (ids and scores) vs
            the library's search, and full searches (also keys and values) vs
            the library's search plus ``np.take`` of keys and values; all timed
            in rotating order, in blocks of one untimed and two timed calls.
            Target: both ratios >= 0.9. The default
            (segmented) memory is reported beside it: its extra cost is the
            price of O(1) FIFO eviction, not of the wrapper.
  speedup   at capacity 262,144 (unless --capacity is given), each approximate
            backend at its fastest swept setting with recall >= 0.9, vs exact. Target >= 3x.

Flags: --capacity N, --full (capacity 262,144), --small, --backends a,b,c,
--queries, -k, --dim, --chunk, --repeats, --seed, --data auto|minilm|synthetic
(see benchmarks/data.py), --out-dir DIR (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import statistics
import sys
import time

import numpy as np

if __package__ in (None, ""):       # python benchmarks/ann.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import kvmemory  # noqa: E402
from kvmemory import Memory  # noqa: E402
from kvmemory.registry import get_backend_class  # noqa: E402

from . import data as data_mod  # noqa: E402
from .common import (environment, log, print_table, progress, pyplot, ratio, result_path,  # noqa: E402
                     time_call, write_json)

EPSILON = 1e-3
FULL_CAPACITY = 262_144

#: build options and search settings to sweep, per backend. Option names not
#: declared by the backend class are dropped (with a warning) when adapters are made.
SWEEPS = {
    "exact": {"build": {}, "search": [{}]},
    "torch": {"build": {"device": "cpu"}, "search": [{}]},
    "hnsw": {"build": {"M": 16, "ef_construction": 100},
             "search": [{"ef": e} for e in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)]},
    "faiss": {"build": {},
              "search": [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128)]},
    "scann": {"build": {},
              "search": [{"num_leaves_to_search": n, "reorder": r}
                         for r in (64, 256) for n in (1, 2, 4, 8, 16, 32, 64)]},
}
#: which backends only approximate (they get recall curves, overhead and speedup checks)
EXACT_BACKENDS = ("exact", "torch", "jax")
#: module under benchmarks/direct calling each library directly
DIRECT = {"faiss": "faiss_direct", "hnsw": "hnsw_direct", "scann": "scann_direct"}


# -- adapters -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Adapter:
    """One backend as the harness sees it: fixed build options, search settings to sweep."""

    name: str
    build: dict
    search: list

    @property
    def exact(self) -> bool:
        return self.name in EXACT_BACKENDS

    def memory(self, capacity: int, dim: int) -> Memory:
        return Memory(key_dim=dim, capacity=capacity, num_heads=1, batch_size=1, backend=self.name, **self.build)

    def configure(self, mem: Memory, setting: dict) -> None:
        if setting:
            mem.set_search_options(**setting)


def make_adapter(name: str, sweep: dict | None = None):
    """The adapter for backend ``name``, or (None, reason) when its module does not import."""
    try:
        cls = get_backend_class(name)
    except Exception as e:      # ImportError, or a backend module still being written
        return None, f"{type(e).__name__}: {e}"
    sweep = sweep if sweep is not None else SWEEPS.get(name, {"build": {}, "search": [{}]})
    build_names = set(getattr(cls, "build_options", {}))
    search_names = set(getattr(cls, "search_options", {}))
    build = {k: v for k, v in sweep.get("build", {}).items() if k in build_names}
    dropped = sorted(set(sweep.get("build", {})) - build_names)
    search, seen = [], set()
    for setting in sweep.get("search", [{}]):
        s = {k: v for k, v in setting.items() if k in search_names}
        dropped += sorted(set(setting) - search_names - set(dropped))
        key = tuple(sorted(s.items()))
        if key not in seen:
            seen.add(key)
            search.append(s)
    if dropped:
        log(f"[ann] {name}: options {sorted(set(dropped))} not declared by {cls.__name__} "
            f"(build {sorted(build_names)}, search {sorted(search_names)}); dropped")
    return Adapter(name, build, search or [{}]), None


def make_adapters(names):
    adapters, skipped = [], {}
    for name in names:
        adapter, why = make_adapter(name)
        if adapter is None:
            skipped[name] = why
            log(f"[ann] skipping backend {name!r}: {why}")
        else:
            adapters.append(adapter)
    return adapters, skipped


# -- measuring ---------------------------------------------------------------------------------
def to_numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def fill(mem: Memory, keys: np.ndarray, chunk: int, desc: str | None = None) -> float:
    """Add keys [n, D] (values = keys) to a 1-row 1-head memory in chunks; returns seconds."""
    x = keys[None, :, None, :]
    starts = range(0, len(keys), chunk)
    if desc:
        starts = progress(starts, desc, total=len(starts))
    total = 0.0
    for t0 in starts:
        part = x[:, t0:t0 + chunk]
        total += time_call(lambda: mem.add(part, part))
    return total


def search_ids(mem: Memory, queries: np.ndarray, k: int) -> np.ndarray:
    return to_numpy(mem.search(queries[None, :, None, :], k).ids)[0, :, 0, :]


def time_search(mem: Memory, queries: np.ndarray, k: int, repeats: int):
    """(median seconds, ids) of ``repeats`` timed searches after one warm-up."""
    ids = search_ids(mem, queries, k)
    times = [time_call(lambda: mem.search(queries[None, :, None, :], k)) for _ in range(repeats)]
    return statistics.median(times), ids


class Truth:
    """Exact top-k scores of the queries over the live content (keys[first:]), for recall."""

    def __init__(self, keys_all: np.ndarray, first: int, queries: np.ndarray, k: int):
        self.keys_all, self.first, self.queries, self.k = keys_all, first, queries, k
        live = keys_all[first:]
        mem = Memory(key_dim=live.shape[1], capacity=len(live), num_heads=1, batch_size=1, backend="exact")
        fill(mem, live, 4096)
        res = mem.search(queries[None, :, None, :], k)
        scores = to_numpy(res.scores)[0, :, 0, :]
        kk = min(k, len(live))
        self.kth = scores[:, kk - 1]

    def recall(self, ids: np.ndarray) -> float:
        """ann-benchmarks recall@k of ids [Q, k] (stream ids into keys_all; -1 = missing)."""
        ids = np.asarray(ids, np.int64)
        valid = (ids >= self.first) & (ids < len(self.keys_all))
        s = np.einsum("qd,qkd->qk", self.queries, self.keys_all[np.where(valid, ids, 0)])
        hits = valid & (s >= self.kth[:, None] - EPSILON)
        return float(hits.sum() / (ids.shape[0] * min(self.k, len(self.keys_all) - self.first)))


def run_adapter(adapter: Adapter, keys, queries, truth: Truth, args, settings=None) -> dict:
    """Build one memory, then time and score every search setting. Returns a result record."""
    mem = adapter.memory(len(keys), keys.shape[1])
    add_s = fill(mem, keys, args.chunk, desc=f"{adapter.name}: add")
    points = []
    for setting in settings if settings is not None else adapter.search:
        adapter.configure(mem, setting)
        sec, ids = time_search(mem, queries, args.k, args.repeats)
        points.append({"search": setting, "qps": len(queries) / sec, "median_s": sec,
                       "recall": truth.recall(ids)})
    return {"backend": adapter.name, "build": adapter.build, "options": to_jsonable_options(mem.options),
            "add_s": add_s, "add_tokens_per_s": len(keys) / add_s, "points": points}


def to_jsonable_options(options: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in options.items()}


# -- modes ----------------------------------------------------------------------------------------------
def load_data(n, args):
    d = data_mod.dataset(n, args.dim, args.seed, args.queries, source=args.data)
    log(f"[ann] data: {d.source} ({d.description}); keys {d.keys.shape}, queries {d.queries.shape}")
    return d


def each_backend(adapters, one, skip=lambda a: False):
    """[one(a) for a in adapters], except that a backend raising is logged and recorded, not fatal."""
    ok, failed = [], {}
    for a in adapters:
        if skip(a):
            continue
        try:
            r = one(a)
        except Exception as e:       # a backend under construction must not sink the whole run
            failed[a.name] = f"{type(e).__name__}: {e}"
            log(f"[ann] {a.name} failed: {failed[a.name]}")
            continue
        if r is not None:
            ok.append(r)
    return ok, failed


def mode_sweep(args, adapters):
    d = load_data(args.capacity, args)
    truth = Truth(d.keys, 0, d.queries, args.k)

    def one(a):
        log(f"[ann] {a.name}: build {a.build}, {len(a.search)} search setting(s)")
        return run_adapter(a, d.keys, d.queries, truth, args)

    results, failed = each_backend(adapters, one)
    rows = [[r["backend"], _setting(p["search"]), p["recall"], p["qps"], r["add_tokens_per_s"]]
            for r in results for p in r["points"]]
    print_table(f"recall@{args.k} vs queries/s, capacity {args.capacity:,}, {args.queries} queries, data {d.source}",
                ["backend", "search options", "recall", "queries/s", "add tokens/s"], rows)
    png = plot_sweep(results, args, d.source)
    return {"data": _data_record(d), "results": results, "failed": failed, "plot": png}


def mode_churn(args, adapters):
    C = args.capacity
    d = load_data(4 * C, args)
    truth = Truth(d.keys, 3 * C, d.queries, args.k)      # live after churn: the last C keys

    def one(a):
        log(f"[ann] {a.name}: churn, default search options")
        churned = a.memory(C, args.dim)
        first_s = fill(churned, d.keys[:C], args.chunk, desc=f"{a.name}: fill")
        steady_s = fill(churned, d.keys[C:], args.chunk, desc=f"{a.name}: churn 3x")
        fresh = a.memory(C, args.dim)
        fresh_s = fill(fresh, d.keys[3 * C:], args.chunk, desc=f"{a.name}: fresh")
        rec = {}
        for label, mem, id_offset in (("churned", churned, 0), ("fresh", fresh, 3 * C)):
            sec, ids = time_search(mem, d.queries, args.k, args.repeats)
            ids = np.where(ids >= 0, ids + id_offset, -1)       # the fresh memory's ids start at 0
            rec[label] = {"recall": truth.recall(ids), "qps": len(d.queries) / sec}
        r = {"backend": a.name, "fill_tokens_per_s": C / first_s, "churn_tokens_per_s": 3 * C / steady_s,
             "fresh_tokens_per_s": C / fresh_s, **rec}
        r["add_churn_over_fresh"] = ratio(r["churn_tokens_per_s"], r["fresh_tokens_per_s"])
        r["recall_churn_over_fresh"] = ratio(rec["churned"]["recall"], rec["fresh"]["recall"])
        r["qps_churn_over_fresh"] = ratio(rec["churned"]["qps"], rec["fresh"]["qps"])
        return r

    out, failed = each_backend(adapters, one)
    print_table(f"churn: 4 x {C:,} added vs fresh memory of the last {C:,} (target: churn/fresh ratios >= 0.8)",
                ["backend", "add/s churn", "add/s fresh", "add ratio", "recall churn", "recall fresh",
                 "recall ratio", "qps ratio"],
                [[r["backend"], r["churn_tokens_per_s"], r["fresh_tokens_per_s"], r["add_churn_over_fresh"],
                  r["churned"]["recall"], r["fresh"]["recall"], r["recall_churn_over_fresh"],
                  r["qps_churn_over_fresh"]] for r in out])
    return {"data": _data_record(d), "results": out, "failed": failed,
            "target": "churn/fresh ratios >= 0.8 (within 20%; above 1 is fine: "
                      "a fresh memory also pays the first touch of its pages)"}


def mode_overhead(args, adapters):
    """Wrapper cost: kvmemory with one segment (one index, as the direct call builds) vs the library itself.

    Two like-for-like pairs, all four timed in rotating order round after round:
    ``Memory.search(..., with_entries=False)`` (ids, scores, mask) against the
    library's own search (ids, distances), and the full ``Memory.search``
    (also the neighbours' stored keys and values) against the library's search
    followed by the gather a caller would then do (``np.take`` of keys and values
    by id). Also reports kvmemory at its default segment_size: the extra cost
    there is the price of FIFO eviction by time segments, not of the wrapper.
    """
    d = load_data(args.capacity, args)
    truth = Truth(d.keys, 0, d.queries, args.k)
    values = d.keys.copy()      # the memory stores values = keys; the caller's store holds its own copy

    def one(a):
        direct = _direct_module(a.name)
        if direct is None:
            return None
        segmented = run_adapter(a, d.keys, d.queries, truth, args, settings=[{}])["points"][0]
        mem = Adapter(a.name, {**a.build, "segment_size": args.capacity}, a.search).memory(args.capacity, args.dim)
        add_s = fill(mem, d.keys, args.chunk, desc=f"{a.name}: add (one segment)")
        params = to_jsonable_options(mem.options)
        search, build_s = direct.build(d.keys, args.k, "ip", params)
        q4 = d.queries[None, :, None, :]

        def direct_gather():
            # as kvmemory gathers (one buffer for keys and values, so malloc reuses it), on one thread
            ids = search(d.queries).reshape(-1)
            buf = np.empty((2, ids.size, args.dim), np.float32)
            np.take(d.keys, ids, axis=0, out=buf[0], mode="clip")
            np.take(values, ids, axis=0, out=buf[1], mode="clip")
            return buf

        calls = {"kvmemory_ids": lambda: mem.search(q4, args.k, with_entries=False), "direct": lambda: search(d.queries),
                 "kvmemory_full": lambda: mem.search(q4, args.k), "direct_gather": direct_gather}
        ours_ids, their_ids = search_ids(mem, d.queries, args.k), search(d.queries)   # also warm-ups
        times = {name: [] for name in calls}
        names = list(calls)
        for r in range(max(4, 2 * args.repeats)):       # rotating order: machine noise hits all alike
            for name in names[r % 4:] + names[:r % 4]:
                # one untimed call first: faiss' OpenMP workers spin for a while after a call, and
                # whatever runs right after it pays for that (measured: 25.1 vs 20.8 ms per search)
                calls[name]()
                times[name] += [time_call(calls[name]) for _ in range(2)]
        qps = {name: len(d.queries) / statistics.median(t) for name, t in times.items()}
        return {"backend": a.name, "params": params, "kvmemory_ids_qps": qps["kvmemory_ids"],
                "direct_qps": qps["direct"], "qps_ratio": ratio(qps["kvmemory_ids"], qps["direct"]),
                "kvmemory_full_qps": qps["kvmemory_full"], "direct_gather_qps": qps["direct_gather"],
                "full_qps_ratio": ratio(qps["kvmemory_full"], qps["direct_gather"]),
                "full_over_direct": ratio(qps["kvmemory_full"], qps["direct"]),
                "kvmemory_recall": truth.recall(ours_ids), "direct_recall": truth.recall(np.asarray(their_ids)),
                "kvmemory_add_s": add_s, "direct_build_s": build_s,
                "segmented_qps": segmented["qps"], "segmented_recall": segmented["recall"],
                "segmented_over_direct_gather": ratio(segmented["qps"], qps["direct_gather"])}

    out, failed = each_backend(adapters, one, skip=lambda a: a.exact)
    print_table(f"overhead: kvmemory (one segment) vs the library called directly, capacity {args.capacity:,} "
                f"(target: both ratios >= 0.9). ids: with_entries=False vs the library's search; full: "
                f"Memory.search vs the library's search + np.take of keys and values; "
                f"segmented: default segment_size, full results",
                ["backend", "ids q/s", "direct q/s", "ratio", "full q/s", "direct+gather q/s", "ratio",
                 "recall", "direct recall", "segmented q/s", "segm./direct+gather"],
                [[r["backend"], r["kvmemory_ids_qps"], r["direct_qps"], r["qps_ratio"], r["kvmemory_full_qps"],
                  r["direct_gather_qps"], r["full_qps_ratio"], r["kvmemory_recall"], r["direct_recall"],
                  r["segmented_qps"], r["segmented_over_direct_gather"]] for r in out])
    return {"data": _data_record(d), "results": out, "failed": failed,
            "target": "kvmemory_ids_qps / direct_qps >= 0.9 and kvmemory_full_qps / direct_gather_qps >= 0.9, "
                      "kvmemory with segment_size = capacity (one index per (row, head), as built by the direct call)"}


def mode_speedup(args, adapters):
    d = load_data(args.capacity, args)
    truth = Truth(d.keys, 0, d.queries, args.k)
    exact_adapter = next((a for a in adapters if a.name == "exact"), None) or make_adapter("exact")[0]
    exact = run_adapter(exact_adapter, d.keys, d.queries, truth, args)
    exact_qps = exact["points"][0]["qps"]

    def one(a):
        r = run_adapter(a, d.keys, d.queries, truth, args)
        ok = [p for p in r["points"] if p["recall"] >= args.min_recall]
        best = max(ok, key=lambda p: p["qps"]) if ok else None
        return {"backend": a.name, "best": best, "speedup": ratio(best and best["qps"], exact_qps), "sweep": r}

    out, failed = each_backend(adapters, one, skip=lambda a: a.exact)
    print_table(f"speedup over exact at recall >= {args.min_recall}, capacity {args.capacity:,} "
                f"(exact {exact_qps:,.0f} q/s; target >= 3x)",
                ["backend", "search options", "recall", "queries/s", "speedup"],
                [[r["backend"], _setting(r["best"]["search"]) if r["best"] else "none reaches recall",
                  r["best"] and r["best"]["recall"], r["best"] and r["best"]["qps"], r["speedup"]] for r in out])
    return {"data": _data_record(d), "exact": exact, "results": out, "failed": failed, "target": "speedup >= 3"}


MODES = {"sweep": mode_sweep, "churn": mode_churn, "overhead": mode_overhead, "speedup": mode_speedup}


# -- helpers ------------------------------------------------------------------------------------------
def _direct_module(name):
    mod = DIRECT.get(name)
    if mod is None:
        return None
    try:
        return importlib.import_module(f"benchmarks.direct.{mod}")
    except Exception as e:
        log(f"[ann] no direct comparison for {name}: benchmarks/direct/{mod}.py: {type(e).__name__}: {e}")
        return None


def _setting(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items()) or "defaults"


def _data_record(d) -> dict:
    return {"source": d.source, "description": d.description, "keys": list(d.keys.shape),
            "queries": list(d.queries.shape)}


def pareto(points):
    """The points no other point beats in both recall and QPS, by recall (ann-benchmarks' frontier)."""
    front, best_qps = [], -1.0
    for p in sorted(points, key=lambda p: (-p["recall"], -p["qps"])):
        if p["qps"] > best_qps:
            front.append(p)
            best_qps = p["qps"]
    return front[::-1]


def plot_sweep(results, args, source):
    plt = pyplot()
    if plt is None:
        log("[ann] matplotlib missing: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        pts = r["points"]
        if len(pts) == 1:
            ax.plot([pts[0]["recall"]], [pts[0]["qps"]], "*", label=r["backend"], markersize=10)
            continue
        front = pareto(pts)
        line, = ax.plot([p["recall"] for p in front], [p["qps"] for p in front], "o-", label=r["backend"])
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], "o", color=line.get_color(), alpha=0.3)
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{args.k} (ann-benchmarks, eps {EPSILON:g})")
    ax.set_ylabel("queries/s (1 row, 1 head); line: Pareto frontier")
    ax.set_title(f"kvmemory backends: capacity {args.capacity:,}, dim {args.dim}, {source} keys")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    path = result_path(f"ann_recall_qps{args.suffix}.png", args.out_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("mode", nargs="?", default="sweep", choices=sorted(MODES))
    p.add_argument("--capacity", type=int, default=None, help="entries in the memory (default 65,536; speedup 262,144)")
    p.add_argument("--full", action="store_true", help=f"capacity {FULL_CAPACITY:,}")
    p.add_argument("--small", action="store_true", help="smoke run: capacity 8,192, 128 queries, 2 repeats")
    p.add_argument("--backends", default=None, help="comma list (default: every registered backend)")
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="tokens per add")
    p.add_argument("--repeats", type=int, default=3, help="timed searches per setting (median)")
    p.add_argument("--min-recall", type=float, default=0.9, help="speedup mode: recall a setting must reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="auto", choices=("auto", "minilm", "synthetic"))
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    if args.capacity is None:
        args.capacity = FULL_CAPACITY if args.full or args.mode == "speedup" else 65_536
    if args.small:
        args.capacity, args.queries, args.repeats = min(args.capacity, 8192), min(args.queries, 128), 2
    full_sweep = args.capacity == FULL_CAPACITY and args.mode == "sweep"
    args.suffix = "_small" if args.small else ("_full" if full_sweep else "")
    args.backends = ([b.strip() for b in args.backends.split(",") if b.strip()] if args.backends
                     else list(kvmemory.available_backends()))
    return args


def main(argv=None):
    args = parse(argv)
    adapters, skipped = make_adapters(args.backends)
    if not adapters:
        raise SystemExit("no backend could be loaded")
    log(f"[ann] mode {args.mode}, capacity {args.capacity:,}, backends {[a.name for a in adapters]}")
    t = time.perf_counter()
    result = MODES[args.mode](args, adapters)
    workload = {"mode": args.mode, "capacity": args.capacity, "dim": args.dim, "queries": args.queries, "k": args.k,
                "chunk": args.chunk, "repeats": args.repeats, "batch": 1, "heads": 1, "metric": "ip",
                "recall": f"ann-benchmarks, epsilon {EPSILON}"}
    payload = {"benchmark": f"ann_{args.mode}", "workload": workload, "environment": environment(),
               "adapters": [dataclasses.asdict(a) for a in adapters], "skipped_backends": skipped,
               "wall_s": time.perf_counter() - t, **result}
    path = write_json(result_path(f"ann_{args.mode}{args.suffix}.json", args.out_dir), payload)
    log(f"[ann] wrote {path}" + (f" and {result['plot']}" if result.get("plot") else ""))
    return payload


if __name__ == "__main__":
    main()
