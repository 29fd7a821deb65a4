"""Batch precompute of the neighbours of every chunk of a database: what RETRO training reads.

``precompute_neighbours(db, name)`` searches the k nearest chunks of every
chunk of the database (by its stored embedding), leaving out the chunk's own
document (``exclude_same_doc``), and writes ``STORE/neighbours/<name>/``:

    meta.json     the database's fingerprint, k, the exclusion, completion, file records
    ids.npy       [num_chunks, k] int64 global chunk ids of the neighbours, best first (-1: none)
    scores.npy    [num_chunks, k] float32 (0 where -1)

It works in blocks of ``block_chunks`` query chunks; each finished block is
written atomically to ``parts/``, so an interrupted precompute resumes where it
stopped. The fingerprint (the store's shard list and index) ties the result
to the database it was computed over: after ``append`` adds documents, the old
result is refused (recompute it, e.g. under another name or with ``overwrite``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil

import numpy as np

from . import store as st
from .index import DEFAULT_MARGIN
from .progress import progress


@dataclasses.dataclass
class Precomputed:
    """ids [N, k] int64 (memory-mapped; -1 where masked), scores [N, k] float32, mask [N, k] bool."""

    ids: np.ndarray
    scores: np.ndarray
    meta: dict

    @property
    def mask(self) -> np.ndarray:
        return np.asarray(self.ids) >= 0


def db_fingerprint(db) -> str:
    """A hash of what the neighbours depend on: the shards (names, contents, sizes), embedder and index."""
    m = db.manifest
    shards = [(s["name"], s["input_hash"], s["chunks"]) for s in m["shards"]]
    blob = json.dumps({"shards": shards, "embedder": m["embedder"]["hash"], "index": m["index"],
                       "metric": m["metric"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _dir(db, name: str) -> str:
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain directory name, got {name!r}")
    return os.path.join(db.path, "neighbours", name)


def load_neighbours(db, name: str = "train", verify: bool = True) -> Precomputed:
    """A finished precompute of ``db``; ValueError if it is unfinished or was computed over another database."""
    out = _dir(db, name)
    meta = st.read_json(os.path.join(out, "meta.json"), "neighbours manifest")
    if meta.get("db") != db_fingerprint(db):
        raise ValueError(f"neighbours {out!r} were computed over another state of the database "
                         "(documents were added since?): precompute them again")
    if not meta.get("complete"):
        raise ValueError(f"neighbours {out!r} are unfinished: run precompute_neighbours again to resume")
    ids = st.load_array(out, "ids", meta["files"]["ids.npy"], verify)
    scores = st.load_array(out, "scores", meta["files"]["scores.npy"], verify)
    if ids.shape != (db.num_chunks, meta["k"]) or scores.shape != ids.shape:
        raise ValueError(f"neighbours {out!r} have shape {ids.shape}, expected {(db.num_chunks, meta['k'])}")
    return Precomputed(ids, scores, meta)


def precompute_neighbours(db, name: str = "train", k: int = 2, exclude_same_doc: bool = True,
                          block_chunks: int = 8192, margin: int = DEFAULT_MARGIN, overwrite: bool = False,
                          show_progress: bool = False) -> Precomputed:
    """Neighbours of every chunk of ``db`` (see the module docstring); resumes an interrupted run."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(block_chunks, bool) or not isinstance(block_chunks, (int, np.integer)) or block_chunks < 1:
        raise ValueError(f"block_chunks must be an int >= 1, got {block_chunks!r}")
    out = _dir(db, name)
    parts = os.path.join(out, "parts")
    want = {"db": db_fingerprint(db), "k": int(k), "exclude_same_doc": bool(exclude_same_doc),
            "block_chunks": int(block_chunks), "num_chunks": db.num_chunks, "index": db.index_type}
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        meta = st.read_json(meta_path, "neighbours manifest")
        if any(meta.get(key) != value for key, value in want.items()):
            if not overwrite:
                raise ValueError(f"neighbours {out!r} exist with other settings or over another state of the "
                                 f"database ({ {k_: meta.get(k_) for k_ in want} }): pass overwrite=True "
                                 "or another name")
            shutil.rmtree(out)
        elif meta.get("complete"):
            return load_neighbours(db, name)
    os.makedirs(parts, exist_ok=True)
    if not os.path.exists(meta_path):
        st.atomic_write_json(meta_path, {**want, "complete": False})
    N = db.num_chunks
    blocks = range(0, N, block_chunks)
    for a in progress(blocks, total=len(blocks), desc=f"neighbours {name}", enabled=show_progress, unit="block"):
        path = os.path.join(parts, f"block-{a // block_chunks:06d}.npz")
        if os.path.exists(path):
            continue
        ids = np.arange(a, min(a + block_chunks, N), dtype=np.int64)
        exclude = db.chunk_docs(ids)[0] if exclude_same_doc else None
        hits = db.search(db.embeddings(ids), k, exclude, margin)
        buf = io.BytesIO()
        np.savez(buf, ids=hits.ids, scores=hits.scores)
        st.atomic_write_bytes(path, buf.getvalue())
    all_ids = np.full((N, k), -1, np.int64)
    all_scores = np.zeros((N, k), np.float32)
    for a in blocks:
        with np.load(os.path.join(parts, f"block-{a // block_chunks:06d}.npz")) as z:
            b = min(a + block_chunks, N)
            if z["ids"].shape != (b - a, k):
                raise ValueError(f"neighbours part of block {a // block_chunks} in {parts!r} is corrupt")
            all_ids[a:b], all_scores[a:b] = z["ids"], z["scores"]
    files = {}
    for fname, arr in (("ids", all_ids), ("scores", all_scores)):
        tmp = os.path.join(out, f".tmp-{fname}")
        os.makedirs(tmp, exist_ok=True)
        files[fname + ".npy"] = st.write_array(tmp, fname, arr)
        os.replace(os.path.join(tmp, fname + ".npy"), os.path.join(out, fname + ".npy"))
        os.rmdir(tmp)
    st.atomic_write_json(meta_path, {**want, "complete": True, "files": files})
    shutil.rmtree(parts, ignore_errors=True)
    return load_neighbours(db, name, verify=False)
