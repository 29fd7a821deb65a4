"""Speed of backend="exact" against plain brute force, and cost of adds and storage (issue 2).

    python -m benchmarks.exact_speed            # 8 heads x 65,536 keys x 64 dims, 512 queries/head, k=32
    python -m benchmarks.exact_speed --small    # tiny sizes, a few seconds (smoke run)

Measures, on one data set (random N(0, 1) keys and queries: brute-force cost
does not depend on the data; batch 1, ``--heads`` heads):

1. search - exact top-k of ``--queries`` queries per head over ``--capacity``
   keys per head, by kvmemory ``Memory(backend="exact").search`` and by the
   plain ways of doing it, each over all heads: numpy matmul + argpartition +
   sort of the k, per head; ``faiss.knn`` (inner product); ScaNN brute force
   (``score_brute_force``, ``search_batched``); torch matmul + topk. Libraries
   that are not installed are skipped. One warm-up round, then ``--repeats``
   interleaved rounds (each round runs every method once, in a rotating
   order); the median is reported. Every method's ids are checked against
   numpy's (score ties allowed). Target: kvmemory throughput >= 0.5x the
   fastest other method.
2. add - one ``--segment``-token add (all heads, values included) into an
   empty memory vs into a full one (every add evicts). "Empty" is measured
   twice: a memory filled and then cleared (pages resident: the target
   compares with this one) and a brand-new memory (also pays the first touch
   of its freshly allocated pages). Target: full / empty <= 1.3.
3. resident size - bytes of the backend's ring buffers, and bytes numpy
   allocated (tracemalloc) while building and filling the memory, vs the raw
   keys + values bytes. Target <= 1.1x.

Writes benchmarks/results/exact_speed.json (``--out`` to change) and prints a table.
Flags: --heads --capacity --dim --queries -k --segment --repeats --add-repeats
--methods (comma list of: kvmemory,numpy,faiss,scann,torch) --seed --out --small.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tracemalloc

import numpy as np

if __package__ in (None, ""):       # python benchmarks/exact_speed.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

from kvmemory import Memory  # noqa: E402

from .common import (environment, has_module, log, print_table, ratio, result_path,  # noqa: E402
                     summary, time_interleaved, write_json)

METHODS = ("kvmemory", "numpy", "faiss", "scann", "torch")

# -- the search methods: each maker returns fn() -> ids [H, Q, k] ---------------------------


def make_kvmemory(keys, queries, k):
    H, N, D = keys.shape
    mem = Memory(key_dim=D, capacity=N, num_heads=H, batch_size=1, backend="exact")
    mem.add(keys.transpose(1, 0, 2)[None], np.zeros((1, N, H, D), np.float32))
    q = np.ascontiguousarray(queries.transpose(1, 0, 2)[None])     # [1, Q, H, D]
    return lambda: mem.search(q, k).ids[0].transpose(1, 0, 2)


def make_numpy(keys, queries, k):
    def run():
        out = []
        for kh, qh in zip(keys, queries):
            s = qh @ kh.T
            idx = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
            order = np.argsort(-np.take_along_axis(s, idx, 1), axis=1)
            out.append(np.take_along_axis(idx, order, 1))
        return np.stack(out)
    return run


def make_faiss(keys, queries, k):
    import faiss

    def run():
        return np.stack([faiss.knn(qh, kh, k, metric=faiss.METRIC_INNER_PRODUCT)[1] for kh, qh in zip(keys, queries)])
    return run


def make_scann(keys, queries, k):
    from scann import scann_ops_pybind
    searchers = [scann_ops_pybind.builder(kh, k, "dot_product").score_brute_force().build() for kh in keys]

    def run():
        return np.stack([s.search_batched(qh, final_num_neighbors=k)[0] for s, qh in zip(searchers, queries)])
    return run


def make_torch(keys, queries, k):
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    kt, qt = torch.from_numpy(keys), torch.from_numpy(queries)

    def run():
        with torch.inference_mode():
            return np.stack([torch.topk(qh @ kh.T, k, dim=1).indices.numpy() for kh, qh in zip(kt, qt)])
    return run


MAKERS = {"kvmemory": make_kvmemory, "numpy": make_numpy, "faiss": make_faiss,
          "scann": make_scann, "torch": make_torch}
REQUIRES = {"faiss": "faiss", "scann": "scann", "torch": "torch"}


def agreement(ids, ref_ids, keys, queries, k) -> float:
    """Fraction of returned ids whose true score reaches the reference k-th score (ties count)."""
    ids = np.asarray(ids, np.int64)
    H = keys.shape[0]
    ok = 0
    for h in range(H):
        kth = np.einsum("qd,qd->q", queries[h], keys[h][ref_ids[h, :, k - 1]])
        valid = ids[h] >= 0
        s = np.einsum("qd,qkd->qk", queries[h], keys[h][np.where(valid, ids[h], 0)])
        ok += int(((s >= kth[:, None] - 1e-3 * np.maximum(1, np.abs(kth[:, None]))) & valid).sum())
    return ok / ids.size


# -- benchmarks ------------------------------------------------------------------------


def bench_search(args, keys, queries):
    methods = [m for m in args.methods if m not in REQUIRES or has_module(REQUIRES[m])]
    skipped = [m for m in args.methods if m not in methods]
    if skipped:
        log(f"[exact_speed] not installed, skipped: {', '.join(skipped)}")
    fns = {}
    for m in methods:
        try:
            fns[m] = MAKERS[m](keys, queries, args.k)
        except Exception as e:     # a broken optional library must not sink the run
            log(f"[exact_speed] {m} failed to set up: {e!r}")
    ref = make_numpy(keys, queries, args.k)()
    agree = {m: agreement(fn(), ref, keys, queries, args.k) for m, fn in fns.items()}
    log(f"[exact_speed] timing search: {', '.join(fns)} ({args.repeats} rounds)")
    times = time_interleaved(fns, repeats=args.repeats, warmup=1)
    n_queries = queries.shape[0] * queries.shape[1]
    out = {}
    for m, t in times.items():
        s = summary(t)
        out[m] = {**s, "qps": n_queries / s["median_s"], "agreement_with_numpy": agree[m]}
    others = {m: r for m, r in out.items() if m != "kvmemory"}
    fastest = max(others, key=lambda m: others[m]["qps"]) if others else None
    result = {"methods": out, "fastest_other": fastest, "skipped": skipped,
              "kvmemory_vs_fastest": ratio(out.get("kvmemory", {}).get("qps"),
                                           others[fastest]["qps"] if fastest else None),
              "target": ">= 0.5"}
    return result


def bench_add(args, rng):
    """One segment add into: a new memory ("empty": its pages are touched for the first time),
    a full-then-cleared memory ("cleared": empty, pages already resident), a full memory ("full":
    every add evicts). The target compares full with cleared, which differ only by eviction."""
    H, C, D, T = args.heads, args.capacity, args.dim, args.segment
    seg_k = rng.standard_normal((1, T, H, D), dtype=np.float32)
    seg_v = rng.standard_normal((1, T, H, D), dtype=np.float32)
    new = lambda: Memory(key_dim=D, capacity=C, num_heads=H, batch_size=1, backend="exact")  # noqa: E731
    fill_k = rng.standard_normal((1, C, H, D), dtype=np.float32)
    full, cleared = new(), new()
    full.add(fill_k, fill_k)
    cleared.add(fill_k, fill_k)
    del fill_k
    holder = {"empty": None}

    def fresh():
        holder["empty"] = None
        holder["empty"] = new()

    fns = {"empty": lambda: holder["empty"].add(seg_k, seg_v), "cleared": lambda: cleared.add(seg_k, seg_v),
           "full": lambda: full.add(seg_k, seg_v)}
    log(f"[exact_speed] timing add: {args.add_repeats} rounds")
    times = time_interleaved(fns, repeats=args.add_repeats, warmup=2,
                             setup={"empty": fresh, "cleared": cleared.clear})
    res = {m: {**summary(t), "tokens_per_s": T / summary(t)["median_s"]} for m, t in times.items()}
    return {"segment_tokens": T, **res,
            "full_over_cleared": ratio(res["full"]["median_s"], res["cleared"]["median_s"]),
            "full_over_empty": ratio(res["full"]["median_s"], res["empty"]["median_s"]), "target": "<= 1.3",
            "note": "target on full_over_cleared; 'empty' (a new memory) also pays first-touch page faults"}


def bench_memory(args, rng):
    H, C, D = args.heads, args.capacity, args.dim
    keys = rng.standard_normal((1, C, H, D), dtype=np.float32)
    raw = 2 * keys.nbytes                                  # keys + values (value_dim = key_dim)
    gc.collect()
    tracemalloc.start()
    mem = Memory(key_dim=D, capacity=C, num_heads=H, batch_size=1, backend="exact")
    for t0 in range(0, C, 4096):
        mem.add(keys[:, t0:t0 + 4096], keys[:, t0:t0 + 4096])
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ring = getattr(mem.backend, "ring", None)
    ring_bytes = None
    if ring is not None:
        ring_bytes = sum(a.nbytes for a in (ring.keys, ring.values, ring.sqnorms, ring.counts) if a is not None)
    return {"raw_bytes": raw, "ring_bytes": ring_bytes, "traced_bytes": traced, "traced_peak_bytes": peak,
            "ring_over_raw": ratio(ring_bytes, raw), "traced_over_raw": ratio(traced, raw), "target": "<= 1.1"}


# -- main ------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--capacity", type=int, default=65536, help="keys per head (memory capacity)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=512, help="queries per head")
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--segment", type=int, default=512, help="tokens per add in the add test")
    p.add_argument("--repeats", type=int, default=5, help="timed search rounds (median reported)")
    p.add_argument("--add-repeats", type=int, default=21, help="timed add rounds")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/exact_speed.json)")
    p.add_argument("--small", action="store_true", help="tiny sizes for a smoke run")
    args = p.parse_args(argv)
    if args.small:
        args.heads, args.capacity, args.queries, args.repeats, args.add_repeats = 2, 4096, 64, 3, 7
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        p.error(f"unknown methods {bad}; choose from {METHODS}")
    return args


def main(argv=None):
    args = parse(argv)
    rng = np.random.default_rng(args.seed)
    H, N, D, Q = args.heads, args.capacity, args.dim, args.queries
    keys = rng.standard_normal((H, N, D), dtype=np.float32)
    queries = rng.standard_normal((H, Q, D), dtype=np.float32)
    search = bench_search(args, keys, queries)
    del keys, queries
    add = bench_add(args, rng)
    memory = bench_memory(args, rng)

    workload = {"batch": 1, "heads": H, "capacity": N, "dim": D, "queries_per_head": Q, "k": args.k,
                "data": "random N(0,1) float32", "small": args.small}
    payload = {"benchmark": "exact_speed", "workload": workload, "environment": environment(),
               "search": search, "add": add, "memory": memory}
    path = write_json(args.out or result_path("exact_speed.json" if not args.small else "exact_speed_small.json"),
                      payload)

    rows = []
    for m, r in sorted(search["methods"].items(), key=lambda kv: -kv[1]["qps"]):
        rows.append([m, r["median_s"] * 1e3, r["qps"], r["qps"] / search["methods"][search["fastest_other"]]["qps"]
                     if search["fastest_other"] else None, r["agreement_with_numpy"]])
    print_table(f"exact search: {H} heads x {N:,} keys x {D}, {Q} queries/head, k={args.k}",
                ["method", "median ms", "queries/s", "vs fastest other", "agreement"], rows)
    print_table("targets", ["check", "value", "target"], [
        ["kvmemory exact / fastest search", search["kvmemory_vs_fastest"], search["target"]],
        [f"add {args.segment} tokens: full / empty (cleared)", add["full_over_cleared"], add["target"]],
        [f"add {args.segment} tokens: full / empty (new memory)", add["full_over_empty"], ""],
        ["  add ms: new / cleared / full", " / ".join(f"{add[m]['median_s'] * 1e3:.2f}"
                                                     for m in ("empty", "cleared", "full")), ""],
        ["ring bytes / raw keys+values", memory["ring_over_raw"], memory["target"]],
        ["numpy-allocated bytes / raw", memory["traced_over_raw"], memory["target"]],
    ])
    log(f"[exact_speed] wrote {path}")
    return payload


if __name__ == "__main__":
    main()
