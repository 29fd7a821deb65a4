"""The Memorizing Transformer's training step, per backend: search every (row, head), then add (issue 12).

    python -m benchmarks.step                  # capacities 8,192 / 16,384 / 65,536 (a few minutes on 2 cores)
    python -m benchmarks.step --quick          # capacity 2,048, well under a minute
    python -m benchmarks.step --baseline REV   # also time backend "exact" as it was at git revision REV

The step is the paper's: a memory of ``--batch`` (4) rows x ``--heads`` (8)
heads, dim 64, is searched with ``--tokens`` (512) queries per (row, head)
for the top ``-k`` (32) with their keys and values (what kNN attention
reads), then the same number of tokens is added to every row. Every memory
is first filled to capacity, so each step's add evicts the oldest 512
entries of each row (FIFO), as in training.

Keys are ``benchmarks.data`` keys (real MiniLM attention keys when the model
package is installed, else its synthetic mixture), one stream of
``max capacity + tokens`` keys and ``tokens`` queries; (row, head) ``(b, h)``
sees that stream through its own random orthogonal rotation (dot products,
so search difficulty, unchanged; an index per (row, head) sees different
coordinates) starting at its own offset, wrapping around. Values are the keys.

Per capacity, every backend (``exact``, ``torch`` on CPU, ``faiss``,
``scann``, ``hnsw`` at their default options; those not installed are
skipped with the reason) gets a memory filled with identical content.
Each approximate backend is also swept over cheaper search settings
(``tuning_grid``: fractions of its default effort) and, under the label
``NAME@0.9``, timed at the fastest setting whose recall@k reaches
``--recall-target`` (0.9, the issue's bar; none if no setting does).

``port`` is lucidrains/memorizing-transformers-pytorch's ``KNNMemory`` with
one index per (row, head) (``benchmarks/port.py``; skipped unless installed).
It resets an index that would pass its capacity, so it is filled only to
``capacity - (1 + repeats) * tokens`` entries and never passes capacity during
the timed rounds: it searches fewer entries than the others (in its favour).
Its recall is measured against exact search over what it holds. Then
``--repeats`` interleaved rounds (after one warm-up), each backend in a
rotated order per round, time for each backend:

* ``search_s``: ``search(q, k, with_entries=False)`` - ids and scores only;
* ``full_s``: ``search(q, k)`` - also the neighbours' keys and values;
* ``add_s``: ``add`` of the next 512 tokens (evicting 512);

``step = full + add``; ``gather = full - search`` (result gathering);
medians over rounds. Recall@k against ``exact`` on the same memory, before
the timed rounds: a returned entry counts when its true score (from the
returned key) reaches the exact k-th score less 1e-3 x max(1, |score|).

Roofline of the exact step, measured in the same run: this machine's sgemm
rate (numpy matmul of the step's shapes) and memory bandwidth (numpy copy of
256 MiB), on one BLAS thread and on all cores; the step's flops are
``2 B H T C D`` and its bytes the keys read once plus the keys and values
gathered (read and written) plus the add; the bound is the larger of
flops / rate and bytes / bandwidth.

``--baseline REV`` extracts ``kvmemory/`` at git revision REV (``git archive``)
into a temporary folder, imports it as ``kvmemory_baseline`` and adds its
exact backend as ``exact@REV``: old and new measured side by side, interleaved.

Writes ``results/step.json`` and ``results/step.png`` (``--quick``:
``step_quick.*``, gitignored; ``--tag T``: ``step_T.*``) and prints a
table. ``main(argv)`` is what ``python -m benchmarks`` calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):       # python benchmarks/step.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import kvmemory  # noqa: E402
from kvmemory.registry import get_backend_class  # noqa: E402

from . import data as data_mod  # noqa: E402
from . import port as port_mod  # noqa: E402
from .common import (environment, log, print_table, pyplot, result_path, summary,  # noqa: E402
                     time_call, write_json)

BACKENDS = ("exact", "torch", "faiss", "scann", "hnsw", "port")
BUILD = {"torch": {"device": "cpu"}}
CAPACITIES = (8192, 16384, 65536)
QUICK_CAPACITIES = (2048,)
EPSILON = 1e-3
RECALL_TARGET = 0.9
TUNE_ROUNDS = 3           # timings per swept setting (medians pick the fastest)


def tuning_grid(name: str, options: dict) -> list[dict]:
    """Search options to try for an approximate backend: fractions of its default effort (faster, lower recall).

    ``options``: the memory's resolved options (``Memory.options``) at their defaults.
    """
    fractions = ((1, 4), (1, 3), (1, 2), (2, 3))
    if name == "faiss":
        kind = str(options.get("index", "")).lower()     # "ivf", "hnsw" or a factory string
        key = "ef_search" if "hnsw" in kind else "nprobe" if "ivf" in kind else None
        return [{key: max(1, options[key] * a // b)} for a, b in fractions] if key else []
    if name == "scann":
        leaves = options["num_leaves_to_search"]
        return [{"num_leaves_to_search": max(1, leaves * a // b), "reorder": r} for a, b in fractions[1:]
                for r in (64, 128)]
    if name == "hnsw":
        return [{"ef": e} for e in (32, 40, 48)]          # hnswlib needs ef >= k
    return []


# -- data ----------------------------------------------------------------------------------------------------
class Stream:
    """Keys [B, n, H, D] for stream positions [i, i + n) of every (row, head): rotated, offset views of one stream."""

    def __init__(self, keys: np.ndarray, queries: np.ndarray, batch: int, heads: int, seed: int):
        rng = np.random.default_rng(seed)
        D = keys.shape[1]
        q, r = np.linalg.qr(rng.standard_normal((batch * heads, D, D)))
        self.rot = (q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]).astype(np.float32)   # [BH, D, D]
        self.offset = rng.integers(0, len(keys), batch * heads)
        self.keys, self.B, self.H = keys, batch, heads
        # queries [B, T, H, D]
        self.queries = np.einsum("td,gde->gte", queries, self.rot).reshape(batch, heads, -1, D).transpose(0, 2, 1, 3)
        self.queries = np.ascontiguousarray(self.queries)

    def tokens(self, i: int, n: int) -> np.ndarray:
        N, D = self.keys.shape
        pos = (self.offset[:, None] + i + np.arange(n)) % N                     # [BH, n]
        x = np.einsum("gtd,gde->gte", self.keys[pos], self.rot)                 # [BH, n, D]
        return np.ascontiguousarray(x.reshape(self.B, self.H, n, D).transpose(0, 2, 1, 3))


# -- backends --------------------------------------------------------------------------------------------------
def load_baseline(rev: str):
    """kvmemory as it was at git revision ``rev``, imported as the package ``kvmemory_baseline``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="kvmemory_baseline_")
    archive = subprocess.run(["git", "archive", rev, "kvmemory"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    pkg = os.path.join(tmp, "kvmemory")
    spec = importlib.util.spec_from_file_location("kvmemory_baseline", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvmemory_baseline"] = module
    spec.loader.exec_module(module)
    module.register_backend("exact_baseline", "kvmemory_baseline.backends.exact:ExactBackend")
    return module


def make_memories(names, capacity, args, baseline):
    """{label: Memory} of every backend that builds, and {name: reason} for those skipped."""
    mems, skipped = {}, {}
    shape = dict(key_dim=args.dim, capacity=capacity, num_heads=args.heads, batch_size=args.batch)
    for name in names:
        if name == port_mod.LABEL:
            try:
                mems[name] = port_mod.PortMemory(args.batch, args.heads, args.dim, port_room(capacity, args))
            except Exception as e:
                skipped[name] = f"{type(e).__name__}: {e}"
                log(f"[step] skipping {name}: {skipped[name]}")
            continue
        try:
            get_backend_class(name)
            opts = dict(BUILD.get(name, {}))
            if args.threads is not None and name != "torch":
                opts["num_threads"] = args.threads
            mems[name] = kvmemory.Memory(backend=name, **shape, **opts)
        except Exception as e:       # not installed, or failing: skip it, say why
            skipped[name] = f"{type(e).__name__}: {e}"
            log(f"[step] skipping {name}: {skipped[name]}")
    if baseline is not None:
        opts = {"num_threads": args.threads} if args.threads is not None else {}
        mems[f"exact@{args.baseline}"] = baseline.Memory(backend="exact_baseline", **shape, **opts)
    return mems, skipped


def port_fill(capacity, args) -> int:
    """Entries the port gets before the timed rounds: its adds during them then never pass capacity
    (it resets when full), so it searches at most capacity - tokens entries (fewer than the others)."""
    return max(capacity - (1 + args.repeats) * args.tokens, args.k)


def port_room(capacity, args) -> int:
    return max(capacity, port_fill(capacity, args) + (1 + args.repeats) * args.tokens)


def to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def recall(res, truth_scores, queries, k) -> float:
    """Share of the k slots holding an entry whose true score reaches the exact k-th score (ties count)."""
    keys, mask = to_numpy(res.keys), to_numpy(res.mask)
    true = np.einsum("bthd,bthkd->bthk", queries, keys)
    kth = truth_scores[..., k - 1:k]
    return float((mask & (true >= kth - EPSILON * np.maximum(1, np.abs(kth)))).mean())


# -- roofline ----------------------------------------------------------------------------------------------------
def machine_rates(args, capacity) -> dict:
    """sgemm GFLOP/s at the step's shapes and copy bandwidth GB/s, one BLAS thread and the default."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.tokens, args.dim), dtype=np.float32)
    keys = rng.standard_normal((min(capacity, 16384), args.dim), dtype=np.float32)
    out = np.empty((keys.shape[0], args.tokens), np.float32)
    big = np.ones(64 << 20, np.float32)            # 256 MiB
    dst = np.empty_like(big)

    def rates():
        mm = min(time_call(lambda: np.matmul(keys, q.T, out=out)) for _ in range(5))
        cp = min(time_call(lambda: np.copyto(dst, big)) for _ in range(3))
        return {"matmul_gflops": 2 * keys.shape[0] * args.tokens * args.dim / mm / 1e9,
                "copy_gb_per_s": 2 * big.nbytes / cp / 1e9}

    result = {"default_threads": rates()}
    try:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1, user_api="blas"):
            result["one_blas_thread"] = rates()
    except ImportError:
        pass
    return result


def roofline(args, capacity, rates, exact_step_s, exact_search_s) -> dict:
    B, H, T, D, k = args.batch, args.heads, args.tokens, args.dim, args.k
    flops = 2 * B * H * T * capacity * D
    gathered = B * T * H * k * 2 * D * 4                     # keys and values returned
    bytes_ = B * H * capacity * D * 4 + 2 * gathered + 2 * 2 * B * T * H * D * 4
    best = max(rates.values(), key=lambda r: r["matmul_gflops"])
    bound = max(flops / (best["matmul_gflops"] * 1e9), bytes_ / (best["copy_gb_per_s"] * 1e9))
    return {"flops": flops, "bytes": bytes_, "matmul_gflops": best["matmul_gflops"],
            "copy_gb_per_s": best["copy_gb_per_s"], "bound_s": bound,
            "exact_step_s": exact_step_s, "step_over_bound": exact_step_s / bound if exact_step_s else None,
            "exact_search_gflops": flops / exact_search_s / 1e9 if exact_search_s else None}


# -- one capacity ------------------------------------------------------------------------------------------------
def tuned_label(name: str, target: float) -> str:
    """The label of backend ``name`` at its fastest setting reaching recall ``target``: "faiss@0.9"."""
    return f"{name}@{target:g}"


def tune(name, mem, q, k, truth, target, rounds: int = TUNE_ROUNDS) -> dict:
    """Sweep ``tuning_grid`` on a filled memory: recall and median search time (``rounds`` interleaved
    timings) of each setting; the fastest setting reaching ``target`` recall (None if none does).
    The memory is left at its default options."""
    points = [{"search": opts} for opts in tuning_grid(name, mem.options)]
    for p in points:
        mem.set_search_options(**p["search"])
        p["recall"] = recall(mem.search(q, k), truth, q, k)
        p["times_s"] = []
    for _ in range(rounds):
        for p in points:
            mem.set_search_options(**p["search"])
            p["times_s"].append(time_call(lambda: mem.search(q, k, with_entries=False)))
    for p in points:
        p["search_s"] = summary(p.pop("times_s"))["median_s"]
    if points:
        mem.set_search_options(**{key: None for key in points[0]["search"]})
    good = [p for p in points if p["recall"] >= target]
    return {"target": target, "points": points, "chosen": min(good, key=lambda p: p["search_s"]) if good else None}


def run_capacity(capacity, args, stream, baseline) -> dict:
    mems, skipped = make_memories(args.backends, capacity, args, baseline)
    fill_s = {}
    for label, mem in mems.items():
        t = 0.0
        size, chunk = capacity, args.tokens
        if label == port_mod.LABEL:     # each port add ships every index through joblib: fill in big chunks
            size, chunk = port_fill(capacity, args), max(args.tokens, port_mod.FILL_CHUNK)
        for i in range(0, size, chunk):
            x = stream.tokens(i, min(chunk, size - i))
            t += time_call(lambda: mem.add(x, x))
        fill_s[label] = t
        log(f"[step] capacity {capacity:,}: {label} filled in {t:.1f} s")
    q, k = stream.queries, args.k
    truth = to_numpy(mems["exact"].search(q, k).scores) if "exact" in mems else None
    recalls, tuning = {}, {}
    for label, mem in mems.items():
        ref = mem.exact_scores(q, k) if label == port_mod.LABEL else truth
        recalls[label] = recall(mem.search(q, k), ref, q, k) if ref is not None else None
        if truth is not None and args.recall_target and tuning_grid(label, mem.options):
            tuning[label] = tune(label, mem, q, k, truth, args.recall_target)
            log(f"[step] capacity {capacity:,}: {label} at recall >= {args.recall_target}: "
                f"{tuning[label]['chosen'] and tuning[label]['chosen']['search']}")
    # (label, memory, search options): a tuned label shares its backend's memory under other options
    runs = {label: (label, mem, {}) for label, mem in mems.items()}
    for label, tuned in tuning.items():
        if tuned["chosen"] is not None:
            opts = tuned["chosen"]["search"]
            runs[label] = (label, mems[label], {key: None for key in opts})
            runs[tuned_label(label, tuned["target"])] = (label, mems[label], opts)
            recalls[tuned_label(label, tuned["target"])] = tuned["chosen"]["recall"]

    labels = list(runs)
    times = {label: {"search_s": [], "full_s": [], "add_s": []} for label in labels}
    # labels sharing one memory are searched one after the other under their own options; the memory
    # then gets one add per round, timed once and counted for each of them
    groups = {}
    for label in labels:
        groups.setdefault(id(runs[label][1]), []).append(label)
    groups = list(groups.values())
    pos = capacity
    for r in range(1 + args.repeats):
        x = stream.tokens(pos, args.tokens)
        pos += args.tokens
        shift = r % len(groups)
        for group in groups[shift:] + groups[:shift]:
            turn = r % len(group)
            for label in group[turn:] + group[:turn]:
                _, mem, opts = runs[label]
                if opts:
                    mem.set_search_options(**opts)
                t = {"search_s": time_call(lambda: mem.search(q, k, with_entries=False)),
                     "full_s": time_call(lambda: mem.search(q, k))}
                if r:
                    for key, v in t.items():
                        times[label][key].append(v)
            shared = runs[group[0]][1]
            add_s = time_call(lambda: shared.add(x, x))
            if r:
                for label in group:
                    times[label]["add_s"].append(add_s)
    rows = {}
    for label in labels:
        base, mem, opts = runs[label]
        med = {key: summary(v)["median_s"] for key, v in times[label].items()}
        steps = [f + a for f, a in zip(times[label]["full_s"], times[label]["add_s"])]
        if opts:
            mem.set_search_options(**opts)        # so that mem.options are this label's
        rows[label] = {"step": summary(steps), "search_s": med["search_s"], "full_search_s": med["full_s"],
                       "gather_s": max(med["full_s"] - med["search_s"], 0.0), "add_s": med["add_s"],
                       "recall": recalls[label], "fill_s": fill_s[base],
                       "options": {key: repr(v) if not isinstance(v, (int, float, str, bool, type(None))) else v
                                   for key, v in mem.options.items()}}
        if label == port_mod.LABEL:
            rows[label]["entries_searched"] = [port_fill(capacity, args) + i * args.tokens
                                               for i in range(1, 1 + args.repeats)]
            rows[label]["note"] = "always fetches keys and values: search_s includes its gather (gather_s ~ 0)"
    ref = rows.get("exact", {}).get("step", {}).get("median_s")
    for label, row in rows.items():
        row["step_over_exact"] = row["step"]["median_s"] / ref if ref else None
    return {"capacity": capacity, "backends": rows, "skipped": skipped, "tuning": tuning}


# -- output ------------------------------------------------------------------------------------------------------
def label_order(result: dict) -> list:
    """A capacity's labels: backends in BACKENDS order, each followed by its tuned label, then the rest."""
    labels = list(result["backends"])
    tuned = {name: tuned_label(name, t["target"]) for name, t in result.get("tuning", {}).items()}
    ordered = [x for name in BACKENDS for x in (name, tuned.get(name)) if x in labels]
    return ordered + [x for x in labels if x not in ordered]


def plot(results, path, args, source):
    """Per capacity, bars of the median search with entries and the median add; a tick at the step median."""
    plt = pyplot()
    if plt is None:
        return None
    caps = [r["capacity"] for r in results]
    fig, axes = plt.subplots(1, len(caps), figsize=(5 * len(caps), 4.8), squeeze=False)
    for ax, r in zip(axes[0], results):
        names = label_order(r)
        rows = [r["backends"][n] for n in names]
        x = np.arange(len(names))
        search = np.array([b["full_search_s"] * 1e3 for b in rows])
        add = np.array([b["add_s"] * 1e3 for b in rows])
        ax.bar(x, search, label="search with entries")
        ax.bar(x, add, bottom=search, label="add")
        steps = [b["step"]["median_s"] * 1e3 for b in rows]
        ax.scatter(x, steps, marker="_", s=300, color="black", label="step (median)", zorder=3)
        for i, b in enumerate(rows):
            if b["recall"] is not None:
                ax.text(i, max(search[i] + add[i], steps[i]), f"{b['recall']:.2f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"capacity {r['capacity']:,} per (row, head)")
        ax.set_ylabel("ms per step (medians); label: recall@k")
        ax.legend(fontsize=8)
    fig.suptitle(f"kvmemory step: batch {args.batch} x {args.heads} heads, dim {args.dim}, "
                 f"{args.tokens} queries then {args.tokens} tokens added, k={args.k}, {source} keys")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--capacities", default=None, help="comma list of entries per (row, head) "
                   f"(default {','.join(map(str, CAPACITIES))}; --quick {','.join(map(str, QUICK_CAPACITIES))})")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list (missing ones are skipped)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512, help="queries per (row, head), and tokens added per step")
    p.add_argument("-k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after one warm-up (default 3; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="num_threads of the host backends (default: all cores)")
    p.add_argument("--baseline", default=None, metavar="REV", help="also time backend exact at git revision REV")
    p.add_argument("--recall-target", type=float, default=RECALL_TARGET,
                   help="also time each approximate backend at its fastest swept setting reaching this recall@k "
                        f"(default {RECALL_TARGET}; 0: skip)")
    p.add_argument("--data", default="auto", choices=("auto", "minilm", "synthetic"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="capacity 2,048, 2 rounds: well under a minute")
    p.add_argument("--note", default=None, help="free text stored in the JSON (e.g. how the machine was loaded)")
    p.add_argument("--tag", default=None, help="write step_TAG.json / .png (a run with other flags beside the default)")
    p.add_argument("--out-dir", default=None)
    args = p.parse_args(argv)
    caps = args.capacities or ",".join(map(str, QUICK_CAPACITIES if args.quick else CAPACITIES))
    try:
        args.capacities = [int(c) for c in caps.split(",") if c.strip()]
    except ValueError:
        p.error(f"--capacities must be a comma list of ints, got {caps!r}")
    for name in ("batch", "heads", "dim", "tokens", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.capacities or min(args.capacities) < args.k:
        p.error(f"--capacities must each be >= k ({args.k}), got {args.capacities}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    baseline = load_baseline(args.baseline) if args.baseline else None
    d = data_mod.dataset(max(args.capacities) + args.tokens, args.dim, args.seed, args.tokens, source=args.data)
    log(f"[step] data: {d.source} ({d.description})")
    stream = Stream(d.keys, d.queries, args.batch, args.heads, args.seed)
    rates = machine_rates(args, max(args.capacities))
    results = []
    for capacity in args.capacities:
        r = run_capacity(capacity, args, stream, baseline)
        ex = r["backends"].get("exact")
        r["roofline"] = roofline(args, capacity, rates, ex and ex["step"]["median_s"], ex and ex["search_s"])
        results.append(r)
        rows = [[label, b["step"]["median_s"] * 1e3, b["search_s"] * 1e3, b["gather_s"] * 1e3, b["add_s"] * 1e3,
                 b["step_over_exact"], b["recall"], b["fill_s"]] for label, b in r["backends"].items()]
        rf = r["roofline"]
        print_table(f"step at capacity {capacity:,} per (row, head): batch {args.batch} x {args.heads} heads, "
                    f"{args.tokens} queries (k={args.k}) then {args.tokens} tokens added; medians of {args.repeats}",
                    ["backend", "step ms", "search ms", "gather ms", "add ms", "step / exact", f"recall@{args.k}",
                     "fill s"], rows)
        print(f"roofline (exact): {rf['flops'] / 1e9:.1f} GFLOP, {rf['bytes'] / 1e9:.2f} GB per step; "
              f"{rf['matmul_gflops']:.0f} GFLOP/s, {rf['copy_gb_per_s']:.1f} GB/s measured -> bound "
              f"{rf['bound_s'] * 1e3:.0f} ms; exact step {(rf['exact_step_s'] or 0) * 1e3:.0f} ms "
              f"({rf['step_over_bound'] or 0:.1f}x the bound)")
    workload = {"batch": args.batch, "heads": args.heads, "dim": args.dim, "tokens": args.tokens, "k": args.k,
                "capacities": args.capacities, "repeats": args.repeats, "threads": args.threads,
                "baseline": args.baseline, "metric": "ip", "memory": "filled to capacity: every add evicts"}
    env = environment()
    env["env_threads"] = {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    payload = {"benchmark": "step", "workload": workload, "environment": env, "note": args.note,
               "data": {"source": d.source, "description": d.description}, "machine_rates": rates,
               "results": results, "wall_s": time.perf_counter() - t0}
    png = plot(results, result_path(f"step{args.suffix}.png", args.out_dir), args, d.source)
    payload["plot"] = png and os.path.basename(png)
    path = write_json(result_path(f"step{args.suffix}.json", args.out_dir), payload)
    log(f"[step] wrote {path}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
