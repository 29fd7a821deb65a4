"""Time backend="torch" search against plain matmul+topk, faiss brute force, and a roofline.

Default workload (the issue's): 64 indices = batch 8 x heads 8, capacity 65,536,
key_dim 64, 512 queries per index, k = 32. ``--small`` (automatic on CPU)
shrinks it so the script runs in seconds. Times are medians over repeats after
warm-up, in milliseconds, with CUDA events on GPU. Results go to
benchmarks/results/torch_search.json and a table is printed.

Roofline per search: max(keys read once at the measured copy bandwidth,
2 * queries * keys * key_dim flops at the measured matmul peak of the
scan dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:
    import kvmemory
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import kvmemory

SMALL = dict(batch=2, heads=2, capacity=4096, key_dim=64, queries=64, k=8)


def timer(device: torch.device, fn, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes, warmup, repeats) -> float:
    """Bytes/s of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(device, lambda: dst.copy_(src), warmup, repeats)
    return 2 * nbytes / (ms / 1e3)


def matmul_peak(device, dtype, n, warmup, repeats) -> float:
    """Flop/s of an n x n x n matmul in dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = timer(device, lambda: a @ b, warmup, repeats)
    return 2 * n ** 3 / (ms / 1e3)


def faiss_brute_force(q, keys, k):
    """A callable running faiss exact inner-product search per index (GPU if faiss has it), or None."""
    try:
        import faiss
    except ImportError:
        return None, None
    G = q.shape[0]
    qs = [q[g].float().cpu().numpy() for g in range(G)]
    if q.device.type == "cuda" and hasattr(faiss, "StandardGpuResources"):
        res = faiss.StandardGpuResources()
        ks = [keys[g].float().contiguous() for g in range(G)]
        qg = [q[g].float().contiguous() for g in range(G)]
        try:
            import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)
        except ImportError:
            return None, None
        return (lambda: [faiss.knn_gpu(res, qg[g], ks[g], k) for g in range(G)]), "faiss-gpu knn_gpu"
    ks = [keys[g].float().cpu().numpy() for g in range(G)]
    return (lambda: [faiss.knn(qs[g], ks[g], k, faiss.METRIC_INNER_PRODUCT) for g in range(G)]), "faiss-cpu knn"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=512, help="queries per index (tokens)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes (default on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--block-bytes", type=int, default=256 << 20)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "torch_search.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    sizes = dict(batch=args.batch, heads=args.heads, capacity=args.capacity, key_dim=args.key_dim,
                 queries=args.queries, k=args.k)
    if args.small or device.type == "cpu":
        sizes = SMALL
    B, H, C, D, T, k = (sizes[n] for n in ("batch", "heads", "capacity", "key_dim", "queries", "k"))
    G = B * H
    torch.manual_seed(0)

    memories = {dt: kvmemory.Memory(D, D, C, H, B, backend="torch", device=str(device), score_dtype=dt,
                                    block_bytes=args.block_bytes, check_finite=False)
                for dt in ("float32", "bfloat16")}
    for start in range(0, C, 4096):
        keys = torch.nn.functional.normalize(torch.randn(B, min(4096, C - start), H, D, device=device), dim=-1)
        for mem in memories.values():
            mem.add(keys, keys)
    keys = memories["float32"].backend.keys.view(G, C, D)
    keys_bf16 = keys.to(torch.bfloat16)
    queries = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    q = queries.transpose(1, 2).reshape(G, T, D)
    q_bf16 = q.to(torch.bfloat16)

    runs = {
        "kvmemory torch fp32": lambda: memories["float32"].search(queries, k),
        "kvmemory torch bf16+rescore": lambda: memories["bfloat16"].search(queries, k),
        "matmul+topk fp32": lambda: torch.topk(torch.bmm(q, keys.transpose(1, 2)), k, -1),
        "matmul+topk bf16": lambda: torch.topk(torch.bmm(q_bf16, keys_bf16.transpose(1, 2)), k, -1),
    }
    faiss_run, faiss_name = faiss_brute_force(q, keys, k)
    if faiss_run is not None:
        runs[faiss_name] = faiss_run

    results = {}
    for name, fn in runs.items():
        try:
            results[name] = {"ms": timer(device, fn, args.warmup, args.repeats)}
        except (RuntimeError, MemoryError) as e:  # e.g. out of memory for the unblocked baselines
            results[name] = {"ms": None, "error": str(e).splitlines()[0]}
        if device.type == "cuda":
            torch.cuda.empty_cache()

    fp32_ids = memories["float32"].search(queries, k).ids
    bf16_ids = memories["bfloat16"].search(queries, k).ids
    same = (fp32_ids[..., :, None] == bf16_ids[..., None, :]).any(-1).float().mean().item()

    big = 1 << 30 if device.type == "cuda" else 64 << 20
    n = 8192 if device.type == "cuda" else 1024
    bandwidth = copy_bandwidth(device, big, args.warmup, args.repeats)
    peaks = {dt: matmul_peak(device, getattr(torch, dt), n, args.warmup, args.repeats)
             for dt in ("float32", "bfloat16")}
    flops = 2 * G * T * C * D
    roofline = {dt: max(G * C * D * size / bandwidth, flops / peaks[dt]) * 1e3
                for dt, size in (("float32", 4), ("bfloat16", 2))}
    for name, r in results.items():
        dt = "bfloat16" if "bf16" in name else "float32"
        r["roofline_ms"] = roofline[dt]
        r["efficiency"] = roofline[dt] / r["ms"] if r["ms"] else None

    report = {
        "workload": {**sizes, "indices": G},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "matmul_peak_TFLOPs": {dt: v / 1e12 for dt, v in peaks.items()},
        "bf16_recall_vs_fp32": same,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    print(f"{G} indices x {C} keys x {D} dims, {T} queries each, k={k} on {report['device']}")
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, matmul peak "
          + ", ".join(f"{dt} {v / 1e12:.2f} TFLOP/s" for dt, v in peaks.items()))
    print(f"{'method':32s} {'ms':>10s} {'roofline ms':>12s} {'of roofline':>12s}")
    for name, r in results.items():
        ms = f"{r['ms']:.3f}" if r["ms"] else r.get("error", "-")[:40]
        eff = f"{100 * r['efficiency']:.1f}%" if r["efficiency"] else "-"
        print(f"{name:32s} {ms:>10s} {r['roofline_ms']:12.3f} {eff:>12s}")
    print(f"bf16+rescore recall of the fp32 top-{k}: {same:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
