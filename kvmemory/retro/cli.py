"""``python -m kvmemory.retro``: build, query, inspect a retro store, and precompute its neighbours.

    python -m kvmemory.retro build --docs DIR --out STORE [--workers N] [--glob '*.py'] ...
    python -m kvmemory.retro query STORE "text" [-k 2] [--exclude-doc NAME_OR_ID]
    python -m kvmemory.retro info STORE
    python -m kvmemory.retro precompute STORE [--name train] [-k 2]

``build`` is resumable: after an interrupt (Ctrl-C, a kill, a crash), run the
same command again; finished shards are skipped. ``--workers N`` (N >= 1)
builds on N Ray workers (a local Ray instance, or ``--ray-address``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _kv(items) -> dict:
    """["a=1", "b=x"] -> {"a": 1, "b": "x"} (values parsed as JSON when they are)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def cmd_build(args) -> int:
    from . import build, documents_from_dir
    docs = documents_from_dir(args.docs, args.glob, exclude_dirs=args.exclude_dir, min_bytes=args.min_bytes,
                              max_bytes=args.max_bytes, max_files=args.max_files)
    if not docs:
        print(f"no files matching {args.glob!r} under {args.docs!r}", file=sys.stderr)
        return 2
    print(f"{len(docs)} documents, {sum(__import__('os').path.getsize(d.path) for d in docs):,} bytes",
          file=sys.stderr)
    t = time.perf_counter()
    report = build(docs, args.out, embedder=args.embedder, embedder_options=_kv(args.embedder_option),
                   index=args.index, index_options=_kv(args.index_option), metric=args.metric,
                   chunk_len=args.chunk_len, shard_chunks=args.shard_chunks, workers=args.workers,
                   ray_address=args.ray_address, gpus_per_worker=args.gpus_per_worker, append=args.append,
                   show_progress=not args.quiet)
    built = report["shards_built"]
    summary = {"store": args.out, "shards_built": len(built), "shards_skipped": len(report["shards_skipped"]),
               "chunks_built": sum(s["chunks"] for s in built), "wall_s": round(time.perf_counter() - t, 2),
               "embed_s": round(sum(s["embed_s"] for s in built), 2),
               "index_s": round(sum(s["index_s"] for s in built), 2), "workers": args.workers}
    print(json.dumps(summary))
    return 0


def _open(args):
    from . import RetroDatabase
    return RetroDatabase(args.store, verify=not getattr(args, "no_verify", False),
                         embedder_options=_kv(getattr(args, "embedder_option", None)))


def cmd_query(args) -> int:
    import numpy as np
    db = _open(args)
    exclude = None
    if args.exclude_doc is not None:
        names = db.doc_names()
        doc = int(args.exclude_doc) if args.exclude_doc.lstrip("-").isdigit() else None
        if doc is None:
            if args.exclude_doc not in names:
                print(f"no document named {args.exclude_doc!r} in {args.store!r}", file=sys.stderr)
                return 2
            doc = names.index(args.exclude_doc)
        exclude = np.array([doc])
    db.embed(["warm up"])             # load the embedder and run it once: the time below is the query's
    t = time.perf_counter()
    nb = db.neighbours([args.text], k=args.k, exclude_doc_ids=exclude)
    ms = 1000 * (time.perf_counter() - t)
    names = db.doc_names()
    rows = []
    for j in range(args.k):
        if not nb.mask[0, j]:
            rows.append({"rank": j + 1, "id": -1})
            continue
        cid = int(nb.ids[0, j])
        doc, pos = (int(x[0]) for x in db.chunk_docs(np.array([cid])))
        rows.append({"rank": j + 1, "id": cid, "score": round(float(nb.scores[0, j]), 4), "doc": doc,
                     "doc_name": names[doc], "chunk": pos, "text": db.text(cid),
                     "continuation": db.text(cid, True)[len(db.text(cid)):]})
    if args.json:
        print(json.dumps({"query": args.text, "excluded_doc": None if exclude is None else int(exclude[0]),
                          "ms": round(ms, 2), "neighbours": rows}))
        return 0
    print(f"query {args.text!r}  ({ms:.1f} ms, excluded doc: {None if exclude is None else int(exclude[0])})")
    for r in rows:
        if r["id"] < 0:
            print(f"  #{r['rank']}: none")
            continue
        print(f"  #{r['rank']}: score {r['score']:.4f}  chunk {r['id']} = {r['doc_name']} [{r['chunk']}]")
        print(f"      neighbour:    {r['text']!r}")
        print(f"      continuation: {r['continuation']!r}")
    return 0


def cmd_info(args) -> int:
    db = _open(args)
    print(json.dumps(db.info(), indent=1))
    return 0


def cmd_precompute(args) -> int:
    from . import precompute_neighbours
    db = _open(args)
    t = time.perf_counter()
    pre = precompute_neighbours(db, args.name, k=args.k, exclude_same_doc=not args.keep_same_doc,
                                overwrite=args.overwrite, show_progress=not args.quiet)
    print(json.dumps({"name": args.name, "chunks": int(pre.ids.shape[0]), "k": int(pre.ids.shape[1]),
                      "masked": int((~pre.mask).sum()), "wall_s": round(time.perf_counter() - t, 2)}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvmemory.retro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or resume, or --append to) a store from files under a directory")
    b.add_argument("--docs", required=True, help="directory of documents")
    b.add_argument("--out", required=True, help="store directory")
    b.add_argument("--glob", default="*", help="file name pattern (default: every file)")
    b.add_argument("--exclude-dir", action="append", default=[], help="skip directories of this name (repeatable)")
    b.add_argument("--min-bytes", type=int, default=0)
    b.add_argument("--max-bytes", type=int, default=None)
    b.add_argument("--max-files", type=int, default=None, help="keep the first N files (sorted by path)")
    b.add_argument("--workers", type=int, default=0, help="0: this process (default); N: N Ray workers")
    b.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    b.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs each Ray worker asks for (embedding)")
    b.add_argument("--embedder", default="minilm", help="minilm (default) or ngram-hash")
    b.add_argument("--embedder-option", action="append", help="NAME=VALUE, e.g. batch_size=128")
    b.add_argument("--index", default="exact", help="exact, faiss-ivf, faiss-ivfpq, faiss-hnsw, scann, hnsw")
    b.add_argument("--index-option", action="append", help="NAME=VALUE, e.g. nprobe=32")
    b.add_argument("--metric", default="ip", choices=("ip", "l2"))
    b.add_argument("--chunk-len", type=int, default=64)
    b.add_argument("--shard-chunks", type=int, default=8192, help="chunks per shard (about)")
    b.add_argument("--append", action="store_true", help="add these documents to an existing store")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(fn=cmd_build)
    q = sub.add_parser("query", help="the nearest chunks of a text, with their continuations")
    q.add_argument("store")
    q.add_argument("text")
    q.add_argument("-k", type=int, default=2)
    q.add_argument("--exclude-doc", default=None, help="a document name or id to leave out")
    q.add_argument("--json", action="store_true")
    q.add_argument("--embedder-option", action="append",
                   help="NAME=VALUE run-time option of the store's embedder, e.g. num_threads=1")
    q.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the store's files")
    q.set_defaults(fn=cmd_query)
    i = sub.add_parser("info", help="what a store holds")
    i.add_argument("store")
    i.add_argument("--no-verify", action="store_true")
    i.set_defaults(fn=cmd_info)
    pc = sub.add_parser("precompute", help="neighbours of every chunk (own document excluded), resumable")
    pc.add_argument("store")
    pc.add_argument("--name", default="train")
    pc.add_argument("-k", type=int, default=2)
    pc.add_argument("--keep-same-doc", action="store_true", help="do not exclude the chunk's own document")
    pc.add_argument("--overwrite", action="store_true")
    pc.add_argument("--quiet", action="store_true")
    pc.add_argument("--no-verify", action="store_true")
    pc.set_defaults(fn=cmd_precompute)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
