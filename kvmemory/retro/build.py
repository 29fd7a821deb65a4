"""The build pipeline: documents -> shards (chunk -> embed -> index -> write), resumable.

``build`` plans the documents into shards of about ``shard_chunks`` chunks
(documents are never split across shards, so a document's chunks are one
contiguous id range of one shard), records the plan in the manifest as
``pending``, and has a runner build every shard that is not finished yet:
the single-process runner here, or :mod:`kvmemory.retro.ray_runner` (``workers``
> 0). Each shard is one independent job, :func:`build_shard`, which writes its
directory under a temporary name and renames it when whole. When every
pending shard exists, the manifest moves them to ``shards``. A killed build
is resumed by running it again with the same documents: finished shards are
skipped. ``append=True`` adds documents (new ids, new shards) to a finished
store; the embedder, tokenizer, chunk length, metric and index must match.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings

import numpy as np

from . import store as st
from .chunking import chunk_documents, make_tokenizer, token_dtype, tokenizer_config
from .documents import Document, as_documents, content_hash
from .embedder import Embedder, make_embedder, same_embedder
from .index import build_index, check_index_type, resolve_options
from .progress import Bar


@dataclasses.dataclass
class ShardJob:
    """One shard to build: its name, its first document id, its documents and their content hash."""

    name: str
    first_doc: int
    docs: list
    input_hash: str
    chunks: int

    def summary(self) -> dict:
        return {"name": self.name, "first_doc": self.first_doc, "docs": len(self.docs),
                "input_hash": self.input_hash}


@dataclasses.dataclass
class BuildSettings:
    """What every shard of a store is built with (picklable: it travels to Ray workers)."""

    chunk_len: int = 64
    pad_id: int = 0
    tokenizer: object = "bytes"
    metric: str = "ip"
    index: str = "exact"
    index_options: dict = dataclasses.field(default_factory=dict)
    embedder: object = "minilm"              # a registered name or an Embedder instance
    embedder_options: dict = dataclasses.field(default_factory=dict)
    show_progress: bool = False

    def make_embedder(self) -> Embedder:
        return make_embedder(self.embedder, **self.embedder_options)


def _load(doc: Document, tokenizer, dtype) -> np.ndarray:
    tokens = doc.load(tokenizer)
    return tokens.astype(dtype, copy=False)


def plan(docs: list, settings: BuildSettings, first_doc: int, first_shard: int, shard_chunks: int) -> list:
    """ShardJobs for ``docs``: consecutive documents, about ``shard_chunks`` chunks each (a bigger document alone)."""
    tok = make_tokenizer(settings.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    jobs, cur, cur_chunks, hashes = [], [], 0, []

    def close():
        nonlocal cur, cur_chunks, hashes
        if cur:
            h = content_hash(hashes)
            jobs.append(ShardJob(f"shard-{first_shard + len(jobs):05d}",
                                 first_doc + sum(len(j.docs) for j in jobs), cur, h, cur_chunks))
        cur, cur_chunks, hashes = [], 0, []

    for d in docs:
        tokens = _load(d, tok, dtype)
        m = -(-len(tokens) // settings.chunk_len)
        if cur and cur_chunks + m > shard_chunks:
            close()
        cur.append(d)
        hashes.append((d.name, tokens))
        cur_chunks += m
    close()
    return jobs


def build_shard(store: str, job: ShardJob, settings: BuildSettings, embedder: Embedder) -> dict:
    """Chunk, embed, index and write one shard (atomically); returns its counts and timings."""
    tok = make_tokenizer(settings.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    t0 = time.perf_counter()
    tokens = [_load(d, tok, dtype) for d in job.docs]
    names = [d.name for d in job.docs]
    if content_hash(zip(names, tokens)) != job.input_hash:
        raise ValueError(f"the documents of {job.name} changed since the build was planned "
                         f"(first: {names[0]!r}); rerun the build to plan it anew")
    chunks = chunk_documents(tokens, settings.chunk_len, job.first_doc, dtype, settings.pad_id,
                             tok.vocab_size, names)
    t1 = time.perf_counter()
    emb = embedder.embed_chunks(chunks.tokens, chunks.lengths, tok, settings.show_progress, desc=f"embed {job.name}")
    t2 = time.perf_counter()
    resolved = resolve_options(settings.index, len(emb), embedder.dim, settings.metric, settings.index_options)
    index_bytes = build_index(emb, settings.metric, resolved).to_bytes()
    t3 = time.perf_counter()
    tmp = st.new_shard_tmp(store, job.name)
    try:
        files = {}
        for name, arr in (("tokens", chunks.tokens), ("lengths", chunks.lengths), ("doc_ids", chunks.doc_ids),
                          ("positions", chunks.positions), ("embeddings", emb), ("docs", chunks.doc_table)):
            files[name + ".npy"] = st.write_array(tmp, name, arr)
        files["docs.json"] = st.write_file(tmp, "docs.json", json.dumps(names).encode())
        if index_bytes is not None:
            files["index.bin"] = st.write_file(tmp, "index.bin", index_bytes)
        t4 = time.perf_counter()
        stats = {"chunk_s": t1 - t0, "embed_s": t2 - t1, "index_s": t3 - t2, "write_s": t4 - t3,
                 "worker_pid": os.getpid()}
        meta = {"format": st.SHARD_FORMAT, "version": st.VERSION, "name": job.name, "input_hash": job.input_hash,
                "first_doc": job.first_doc,
                "counts": {"docs": len(job.docs), "chunks": len(chunks), "tokens": int(sum(len(t) for t in tokens))},
                "files": files, "index": resolved, "embedder": embedder.fingerprint(), "stats": stats}
        st.atomic_write_json(os.path.join(tmp, st.SHARD_META), meta)
        st.commit_shard(store, job.name, tmp)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {"name": job.name, **meta["counts"], **stats}


def run_local(store: str, jobs: list, settings: BuildSettings, embedder: Embedder) -> list:
    """Build the shards one after another in this process."""
    bar = Bar(sum(j.chunks for j in jobs), "build", settings.show_progress, unit="chunk")
    out = []
    try:
        for job in jobs:
            out.append(build_shard(store, job, settings, embedder))
            bar.update(job.chunks)
    finally:
        bar.close()
    return out


def _new_manifest(settings: BuildSettings, fingerprint: dict) -> dict:
    tok = make_tokenizer(settings.tokenizer)
    return {"format": st.FORMAT, "version": st.VERSION, "chunk_len": settings.chunk_len, "pad_id": settings.pad_id,
            "tokenizer": tokenizer_config(tok), "token_dtype": token_dtype(tok.vocab_size).str,
            "embedder": fingerprint, "metric": settings.metric,
            "index": {"type": settings.index, "options": dict(settings.index_options)},
            "shards": [], "pending": []}


def _check_compatible(manifest: dict, fresh: dict, store: str) -> None:
    diffs = [k for k in ("chunk_len", "pad_id", "tokenizer", "token_dtype", "metric", "index")
             if manifest[k] != fresh[k]]
    if not same_embedder(manifest["embedder"], fresh["embedder"]):
        diffs.append("embedder")
    if diffs:
        detail = "; ".join(f"{k}: store {manifest[k]!r}, given {fresh[k]!r}" for k in diffs)
        raise ValueError(f"store {store!r} was built with other settings ({detail})")


def _finished(store: str, job: ShardJob) -> bool:
    meta = st.read_shard_meta(store, job.name)
    if meta is None:
        if os.path.isdir(st.shard_dir(store, job.name)):     # not written by build_shard: start it again
            shutil.rmtree(st.shard_dir(store, job.name))
        return False
    if meta.get("input_hash") == job.input_hash and meta.get("first_doc") == job.first_doc:
        return True
    warnings.warn(f"{job.name} in {store!r} was built from other documents; rebuilding it", RuntimeWarning,
                  stacklevel=3)
    shutil.rmtree(st.shard_dir(store, job.name))
    return False


def build(docs, store: str, *, embedder="minilm", embedder_options: dict | None = None, index: str = "exact",
          index_options: dict | None = None, metric: str = "ip", chunk_len: int = 64, tokenizer="bytes",
          pad_id: int = 0, shard_chunks: int = 8192, workers: int = 0, ray_address: str | None = None,
          gpus_per_worker: float = 0, append: bool = False, show_progress: bool = False) -> dict:
    """Build (or resume, or with ``append`` extend) the database in directory ``store``.

    docs: Documents (see ``documents_from_dir``), token arrays, bytes or texts.
    embedder: a registered name ("minilm", "ngram-hash") with ``embedder_options``, or an Embedder.
    index: "exact" or an ANN type of :data:`kvmemory.retro.index.INDEX_TYPES` with ``index_options``.
    workers: 0 builds in this process; N >= 1 runs N Ray workers (``ray_address`` to join a cluster,
        ``gpus_per_worker`` for each worker's embedder).
    Returns a report: shards built and skipped, chunk counts, per-shard timings, wall seconds.
    """
    t_start = time.perf_counter()
    check_index_type(index)
    if isinstance(shard_chunks, bool) or not isinstance(shard_chunks, (int, np.integer)) or shard_chunks < 1:
        raise ValueError(f"shard_chunks must be an int >= 1, got {shard_chunks!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    tok = make_tokenizer(tokenizer)
    settings = BuildSettings(chunk_len=chunk_len, pad_id=pad_id, tokenizer=tok, metric=metric, index=index,
                             index_options=dict(index_options or {}), embedder=embedder,
                             embedder_options=dict(embedder_options or {}), show_progress=show_progress)
    docs = as_documents(docs, tok)
    emb = settings.make_embedder()
    resolve_options(index, 1024, emb.dim, metric, settings.index_options)   # refuse bad options before any work
    fresh = _new_manifest(settings, emb.fingerprint())
    store = os.fspath(store)
    os.makedirs(st.shards_dir(store), exist_ok=True)
    exists = os.path.exists(st.manifest_path(store))
    manifest = st.read_manifest(store) if exists else fresh
    if exists:
        _check_compatible(manifest, fresh, store)
    done_docs = sum(s["docs"] for s in manifest["shards"])
    jobs = plan(docs, settings, done_docs, len(manifest["shards"]), shard_chunks)
    report = {"store": store, "shards_built": [], "shards_skipped": [], "workers": workers}
    if manifest["pending"]:
        if [j.summary() for j in jobs] != manifest["pending"]:
            raise ValueError(f"store {store!r} has an unfinished build of other documents "
                             f"({len(manifest['pending'])} shards pending): run it again with the same "
                             "documents and shard_chunks to finish it")
    elif manifest["shards"]:
        again = plan(docs, settings, 0, 0, shard_chunks)
        if [j.input_hash for j in again] == [s["input_hash"] for s in manifest["shards"]]:
            report["shards_skipped"] = [s["name"] for s in manifest["shards"]]
            report["wall_s"] = time.perf_counter() - t_start
            return report          # these documents are the store already
        if not append:
            raise ValueError(f"store {store!r} already holds a database of other documents: pass append=True "
                             "(--append) to add these documents to it, or build into a new directory")
    if not manifest["pending"]:
        manifest["pending"] = [j.summary() for j in jobs]
        st.write_manifest(store, manifest)
    st.clean_tmp(store)
    todo = [j for j in jobs if not _finished(store, j)]
    report["shards_skipped"] = [j.name for j in jobs if j not in todo]
    if todo:
        if workers:
            from .ray_runner import run_on_ray
            stats = run_on_ray(store, todo, settings, workers, ray_address, gpus_per_worker=gpus_per_worker)
        else:
            stats = run_local(store, todo, settings, emb)
        report["shards_built"] = stats
    for job in jobs:
        meta = st.read_shard_meta(store, job.name)
        if meta is None:
            raise RuntimeError(f"{job.name} was not written; run the build again to resume it")
        manifest["shards"].append({"name": job.name, "first_doc": job.first_doc, "input_hash": job.input_hash,
                                   **meta["counts"]})
    manifest["pending"] = []
    st.write_manifest(store, manifest)
    report["wall_s"] = time.perf_counter() - t_start
    report["chunks"] = sum(s["chunks"] for s in report["shards_built"]) if todo else 0
    return report
