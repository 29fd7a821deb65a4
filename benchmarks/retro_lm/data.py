"""The database of training chunks, training batches with precomputed neighbours, evaluation windows, leakage."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np
import torch

from kvmemory import retro
from kvmemory_torch.retro import precomputed_neighbours

from ..lm_memory.corpus import Document, fingerprint
from .presets import Preset


def embedder_options(preset: Preset) -> dict:
    """MiniLM with one torch thread: the fastest setting on the shared 2-core machine (benchmarks/retro_db)."""
    return {"num_threads": 1} if preset.embedder == "minilm" and preset.device == "cpu" else {}


def build_database(preset: Preset, docs: list[Document], path: str, append_docs: list[Document] | None = None):
    """The store of ``docs``' chunks at ``path`` (reused if it holds them already); with ``append_docs`` a copy of
    it at ``path``-update with those added. Returns (RetroDatabase, seconds spent building)."""
    t = time.perf_counter()
    options = embedder_options(preset)
    common = dict(embedder=preset.embedder, embedder_options=options, chunk_len=preset.chunk_len, index="exact")
    retro.build([d.data for d in docs], path, **common)
    if append_docs is not None:
        base, path = path, path + "-update"
        if os.path.exists(path):
            shutil.rmtree(path)
        shutil.copytree(base, path, ignore=shutil.ignore_patterns("neighbours"))
        retro.build([d.data for d in append_docs], path, append=True, **common)
    return retro.RetroDatabase(path, embedder_options=options, verify=False), time.perf_counter() - t


def store_path(work_dir: str, preset: Preset, docs: list[Document]) -> str:
    return os.path.join(work_dir, f"db-{preset.embedder}-m{preset.chunk_len}-{fingerprint(docs)}")


class TrainBatches:
    """Random chunk-aligned windows of the database's documents, with each chunk's precomputed neighbours
    (own document excluded)."""

    def __init__(self, preset: Preset, db, docs: list[Document], pre, seed: int):
        self.preset, self.db, self.pre = preset, db, pre
        n = preset.seq_len
        self.docs = [(i, d.data) for i, d in enumerate(docs) if len(d) >= n + 1]
        if not self.docs:
            raise ValueError(f"no training document has the {n + 1} bytes a window needs")
        self.chunks = {i: db.doc_chunks(i) for i, _ in self.docs}
        starts = np.array([(len(data) - n - 1) // preset.chunk_len + 1 for _, data in self.docs], np.float64)
        self.p = starts / starts.sum()
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple:
        """(inputs [B, n], targets [B, n], neighbours [B, L, k, 2m], mask) tensors on the preset's device."""
        P = self.preset
        m, n, L = P.chunk_len, P.seq_len, P.seq_chunks
        rows, ids = [], []
        for j in self.rng.choice(len(self.docs), P.batch, p=self.p):
            i, data = self.docs[j]
            u = int(self.rng.integers(0, (len(data) - n - 1) // m + 1))
            rows.append(data[u * m:u * m + n + 1])
            ids.append(self.chunks[i][u:u + L])
        seq = torch.as_tensor(np.stack(rows).astype(np.int64), device=P.device)
        nb, mask = precomputed_neighbours(self.db, np.asarray(self.pre.ids)[np.stack(ids)], device=P.device)
        return seq[:, :-1], seq[:, 1:], nb, mask


@dataclasses.dataclass
class EvalSet:
    """Evaluation windows: inputs/targets [W, n] uint8, the neighbours' chunk ids [W, L, k] (-1: none)."""

    inputs: np.ndarray
    targets: np.ndarray
    neighbour_ids: np.ndarray
    db: object

    def __len__(self) -> int:
        return len(self.inputs)


def windows(preset: Preset, docs: list[Document], start_fraction: float = 0.0) -> tuple:
    """Non-overlapping chunk-aligned windows of n + 1 bytes from each document, from ``start_fraction`` of it
    (rounded down to a chunk) on. Returns (windows [W, n + 1] uint8, their chunks [W, L, m])."""
    m, n = preset.chunk_len, preset.seq_len
    out = []
    for d in docs:
        a = int(len(d) * start_fraction) // m * m
        for s in range(a, len(d) - n, n):
            out.append(d.data[s:s + n + 1])
    if not out:
        raise ValueError(f"no evaluation document has a window of {n + 1} bytes")
    w = np.stack(out)
    return w, w[:, :n].reshape(len(w), preset.seq_chunks, m)


def first_halves(preset: Preset, docs: list[Document]) -> list[Document]:
    """Each document up to where :func:`windows` with start_fraction 0.5 starts."""
    m = preset.chunk_len
    return [Document(d.name + "#first-half", d.data[:int(len(d) * 0.5) // m * m]) for d in docs]


def eval_set(preset: Preset, db, docs: list[Document], start_fraction: float = 0.0) -> EvalSet:
    """Windows of ``docs`` with the k nearest database chunks of each of their chunks (searched by their text)."""
    w, chunks = windows(preset, docs, start_fraction)
    flat = chunks.reshape(-1, preset.chunk_len)
    ids = db.search(list(flat), preset.k).ids if len(flat) else np.zeros((0, preset.k), np.int64)
    return EvalSet(w[:, :-1], w[:, 1:], ids.reshape(len(w), preset.seq_chunks, preset.k), db)


def ngrams(tokens: np.ndarray, n: int) -> set:
    b = np.ascontiguousarray(tokens, np.uint8).tobytes()
    return {b[i:i + n] for i in range(len(b) - n + 1)}


def chunk_overlap(preset: Preset, ev: EvalSet) -> np.ndarray:
    """[W, L]: the share of chunk i's byte n-grams found in the neighbours (with continuations) it reads
    (those of chunk i - 1; 0 for the first chunk and where none were found)."""
    m, L, g = preset.chunk_len, preset.seq_chunks, preset.near_dup_ngram
    tokens, mask = ev.db.chunk_tokens(ev.neighbour_ids, continuation=True)     # [W, L, k, 2m]
    out = np.zeros((len(ev), L))
    for w in range(len(ev)):
        for i in range(1, L):
            mine = ngrams(ev.inputs[w, i * m:(i + 1) * m], g)
            theirs = set()
            for j in range(tokens.shape[2]):
                theirs |= ngrams(tokens[w, i - 1, j][mask[w, i - 1, j]], g)
            out[w, i] = len(mine & theirs) / max(1, len(mine))
    return out
