"""RETRO database benchmark: build throughput (single process vs 1 and 2 Ray workers), query latency and
recall@2 vs exact per index type, resume after a kill, precompute; over Python standard library sources.

    python -m benchmarks.retro_db            # MiniLM over the 53 stdlib modules of 16-24 KB (~16.7k chunks)
    python -m benchmarks.retro_db --small    # smoke run (seconds): n-gram embedder, 8 files, no Ray

Every build goes through the CLI (``python -m kvmemory.retro build``), as a user would run it.
Documents: the stdlib's ``.py`` files outside test/tests/idle_test/site-packages, of
``--min-bytes``..``--max-bytes`` (the whole stdlib, ~190k chunks, takes ~20 min per MiniLM build on 2
cores at ~170 chunks/s, so the default is a documented subset); ``--full-stdlib`` adds a build of the
whole stdlib with the n-gram embedder (fast) and its exact query latency. The machine is shared: load
averages are recorded with every step. Writes benchmarks/results/retro_db.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

from .common import environment, log, print_table, result_path, write_json

EXCLUDE = ("site-packages", "test", "tests", "idle_test", "__pycache__")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, wait=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "kvmemory.retro", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {out.stderr[-2000:]}")
    return out.stdout


def build_args(store, a, embedder, workers=0, docs_filter=True, extra=()):
    args = ["build", "--docs", sysconfig.get_paths()["stdlib"], "--out", store, "--glob", "*.py", "--quiet",
            "--embedder", embedder, "--shard-chunks", str(a.shard_chunks), "--workers", str(workers)]
    for d in EXCLUDE:
        args += ["--exclude-dir", d]
    if docs_filter:
        args += ["--min-bytes", str(a.min_bytes), "--max-bytes", str(a.max_bytes)]
        if a.max_files:
            args += ["--max-files", str(a.max_files)]
    return args + list(extra)


def timed_build(store, a, embedder, workers=0, docs_filter=True, extra=()):
    load0 = os.getloadavg()
    t = time.perf_counter()
    summary = json.loads(cli(*build_args(store, a, embedder, workers, docs_filter, extra)).strip().splitlines()[-1])
    wall = time.perf_counter() - t
    n = summary["chunks_built"]
    return {"workers": workers, "runner": "ray" if workers else "single process", "chunks": n,
            "shards": summary["shards_built"], "wall_s": wall, "chunks_per_s": n / wall,
            "embed_s_sum": summary["embed_s"], "index_s_sum": summary["index_s"],
            "embed_chunks_per_s_per_worker": n / max(summary["embed_s"], 1e-9),
            "index_chunks_per_s": n / summary["index_s"] if summary["index_s"] >= 0.01 else None,
            "load_before": load0, "load_after": os.getloadavg()}


def kill_and_resume(store, a, embedder, reference):
    """Start a CLI build, SIGKILL it once 2 shards are on disk, run it again; compare with ``reference``."""
    from kvmemory import retro
    p = cli(*build_args(store, a, embedder), wait=False)
    shards = os.path.join(store, "shards")
    t = time.perf_counter()
    while p.poll() is None:
        done = [n for n in os.listdir(shards) if not n.startswith(".")] if os.path.isdir(shards) else []
        if len(done) >= 2:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    p.wait()
    killed_after = time.perf_counter() - t
    left = sorted(os.listdir(shards))
    t = time.perf_counter()
    summary = json.loads(cli(*build_args(store, a, embedder)).strip().splitlines()[-1])
    db, ref = retro.RetroDatabase(store), retro.RetroDatabase(reference)
    ids = np.arange(ref.num_chunks)
    return {"killed_after_s": killed_after, "killed_returncode": p.returncode, "left_on_disk": left,
            "resume_shards_skipped": summary["shards_skipped"], "resume_shards_built": summary["shards_built"],
            "resume_wall_s": time.perf_counter() - t,
            "same_chunks_as_uninterrupted": bool(db.num_chunks == ref.num_chunks and np.array_equal(
                db.chunk_tokens(ids)[0], ref.chunk_tokens(ids)[0])),
            "max_abs_embedding_diff": float(np.abs(db.embeddings(ids) - ref.embeddings(ids)).max())}


def query_sweep(store, a, types):
    """Latency and recall@2 (vs exact) of every index type over the same store, own document excluded."""
    from kvmemory import retro
    from kvmemory.retro.index import INDEX_TYPES
    import importlib.util
    db = retro.RetroDatabase(store)
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(db.num_chunks, min(a.queries, db.num_chunks), replace=False))
    q, own = db.embeddings(ids), db.chunk_docs(ids)[0]
    libs = {"faiss": "faiss", "scann": "scann", "hnsw": "hnswlib"}
    rows, ref = [], None
    for index in types:
        spec = INDEX_TYPES[index]
        if spec is not None and importlib.util.find_spec(libs[spec[0]]) is None:
            continue
        load0 = os.getloadavg()
        build_s = sum(db.with_index(index).values())
        db.search(q[:8], 2, own[:8])                       # untimed warm-up
        t = time.perf_counter()
        hits = db.search(q, 2, exclude_doc_ids=own)
        batch_s = time.perf_counter() - t
        single = []
        for i in range(20):
            t = time.perf_counter()
            db.search(q[i:i + 1], 2, exclude_doc_ids=own[i:i + 1])
            single.append(time.perf_counter() - t)
        if index == "exact":
            ref = hits
        recall = float(np.mean([len(set(g[g >= 0]) & set(r[r >= 0])) / 2 for g, r in zip(hits.ids, ref.ids)]))
        leaks = int((db.chunk_docs(hits.ids)[0] == own[:, None])[hits.mask].sum())
        rows.append({"index": index, "index_build_s": build_s, "index_chunks_per_s": db.num_chunks / build_s
                     if build_s > 1e-3 else None, "batch_queries": len(q), "batch_ms_per_query": 1000 * batch_s / len(q),
                     "single_query_ms_median": 1000 * float(np.median(single)), "recall_at_2": recall,
                     "same_doc_hits": leaks, "masked": int((~hits.mask).sum()),
                     "load_before": load0, "load_after": os.getloadavg()})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", "--quick", action="store_true", help="smoke run: n-gram embedder, 8 files, no Ray, no kill")
    p.add_argument("--embedder", default="minilm")
    p.add_argument("--min-bytes", type=int, default=16000)
    p.add_argument("--max-bytes", type=int, default=24000)
    p.add_argument("--max-files", type=int, default=None)
    p.add_argument("--shard-chunks", type=int, default=2048)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Ray worker counts to build with")
    p.add_argument("--no-kill", action="store_true", help="skip the kill-and-resume run")
    p.add_argument("--full-stdlib", action="store_true", help="also build the whole stdlib with ngram-hash")
    p.add_argument("--work", default=None, help="where the stores go (default: a temporary folder, removed)")
    a = p.parse_args(argv)
    if a.small:
        a.embedder, a.max_files, a.workers, a.no_kill, a.queries, a.shard_chunks = "ngram-hash", 8, [], True, 200, 512
    from kvmemory.retro.index import INDEX_TYPES
    work = a.work or tempfile.mkdtemp(prefix="kvmemory-retro-bench-")
    os.makedirs(work, exist_ok=True)
    result = {"environment": environment(), "embedder": a.embedder,
              "documents": {"root": sysconfig.get_paths()["stdlib"], "glob": "*.py", "exclude_dirs": EXCLUDE,
                            "min_bytes": a.min_bytes, "max_bytes": a.max_bytes, "max_files": a.max_files},
              "chunk_len": 64, "shard_chunks": a.shard_chunks, "builds": [], "cpu_count": os.cpu_count()}
    try:
        local = os.path.join(work, "local")
        shutil.rmtree(local, ignore_errors=True)
        log(f"[retro_db] single-process build ({a.embedder}) -> {local}")
        result["builds"].append(timed_build(local, a, a.embedder))
        from kvmemory import retro
        db = retro.RetroDatabase(local)
        result["documents"].update(files=db.num_docs, chunks=db.num_chunks, bytes=db.info()["tokens"])
        ids = np.arange(db.num_chunks)
        if a.embedder == "minilm":
            # the same single process with torch on one thread, as each Ray worker runs it
            store = os.path.join(work, "local1")
            shutil.rmtree(store, ignore_errors=True)
            log("[retro_db] single-process build, torch on 1 thread")
            row = timed_build(store, a, a.embedder, extra=("--embedder-option", "num_threads=1"))
            row["runner"] = "single process, 1 torch thread"
            result["builds"].append(row)
        for w in a.workers:
            store = os.path.join(work, f"ray{w}")
            shutil.rmtree(store, ignore_errors=True)
            log(f"[retro_db] build on {w} Ray worker(s)")
            row = timed_build(store, a, a.embedder, workers=w)
            other = retro.RetroDatabase(store)
            row["same_chunks_as_single"] = bool(np.array_equal(other.chunk_tokens(ids)[0], db.chunk_tokens(ids)[0]))
            row["max_abs_embedding_diff_vs_single"] = float(np.abs(other.embeddings(ids) - db.embeddings(ids)).max())
            result["builds"].append(row)
        base = result["builds"][0]["chunks_per_s"]
        for row in result["builds"]:
            row["throughput_vs_single"] = row["chunks_per_s"] / base
        if not a.no_kill:
            log("[retro_db] kill a build after 2 shards, resume it")
            store = os.path.join(work, "killed")
            shutil.rmtree(store, ignore_errors=True)
            result["kill_resume"] = kill_and_resume(store, a, a.embedder, local)
        log("[retro_db] query sweep over index types")
        result["queries"] = query_sweep(local, a, list(INDEX_TYPES))
        t = time.perf_counter()
        reopened = retro.RetroDatabase(local, verify=True)
        result["reload_verify_s"] = time.perf_counter() - t
        log("[retro_db] precompute neighbours of every chunk")
        t = time.perf_counter()
        pre = retro.precompute_neighbours(reopened, "train", k=2, overwrite=True)
        result["precompute"] = {"chunks": int(pre.ids.shape[0]), "k": 2, "wall_s": time.perf_counter() - t,
                                "masked": int((~pre.mask).sum()),
                                "same_doc_hits": int((reopened.chunk_docs(pre.ids)[0] == reopened.chunk_docs(ids)[0][:, None])[pre.mask].sum())}
        text = "def parse_args(self, args=None, namespace=None):"
        free = json.loads(cli("query", local, text, "-k", "2", "--json"))
        top = free["neighbours"][0]["doc_name"]
        result["cli_query"] = {"without_exclusion": free, "excluding_top_document": json.loads(
            cli("query", local, text, "-k", "2", "--exclude-doc", top, "--json"))}
        if a.full_stdlib:
            log("[retro_db] whole stdlib, n-gram embedder")
            store = os.path.join(work, "full")
            shutil.rmtree(store, ignore_errors=True)
            full = timed_build(store, a, "ngram-hash", docs_filter=False)
            full["query"] = query_sweep(store, a, ["exact", "faiss-ivf"])
            result["full_stdlib_ngram"] = full
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_end"] = list(os.getloadavg())
    name = "retro_db_small.json" if a.small else "retro_db.json"
    write_json(result_path(name), result)
    d = result["documents"]
    print(f"\n{d['files']} stdlib files of {a.min_bytes}-{a.max_bytes} bytes, {d['chunks']:,} chunks of 64 bytes, "
          f"embedder {a.embedder}, {os.cpu_count()} cores")
    print_table("build (CLI, end to end: process start, model load, chunk, embed, index, write)",
                ["runner", "workers", "wall s", "chunks/s", "vs single", "embed chunks/s/worker", "index chunks/s",
                 "load 1m"],
                [[r["runner"], r["workers"] or 1, r["wall_s"], r["chunks_per_s"], r["throughput_vs_single"],
                  r["embed_chunks_per_s_per_worker"], r["index_chunks_per_s"], r["load_before"][0]]
                 for r in result["builds"]])
    print_table(f"queries: k=2, own document excluded, {a.queries} chunks of the store",
                ["index", "build chunks/s", "batch ms/query", "1 query ms", "recall@2 vs exact", "same-doc hits",
                 "load 1m"],
                [[r["index"], r["index_chunks_per_s"], r["batch_ms_per_query"], r["single_query_ms_median"],
                  r["recall_at_2"], r["same_doc_hits"], r["load_before"][0]] for r in result["queries"]])
    if "kill_resume" in result:
        k = result["kill_resume"]
        print(f"kill/resume: killed after {k['killed_after_s']:.0f} s with {k['left_on_disk']} on disk; resume "
              f"skipped {k['resume_shards_skipped']}, built {k['resume_shards_built']}; same chunks: "
              f"{k['same_chunks_as_uninterrupted']}, max |embedding diff| {k['max_abs_embedding_diff']:.2g}")
    pc = result["precompute"]
    print(f"precompute: {pc['chunks']:,} chunks x k=2 in {pc['wall_s']:.1f} s, same-doc hits {pc['same_doc_hits']}; "
          f"reload with CRC check {result['reload_verify_s']:.2f} s")
    return result


if __name__ == "__main__":
    main()
