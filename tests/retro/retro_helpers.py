"""Shared helpers of the retro tests: a stub embedder with random, tie-free vectors and a brute-force reference."""

from __future__ import annotations

import zlib

import numpy as np

from kvmemory import retro


def random_vectors(texts, dim=16):
    """A vector per text, drawn from a generator seeded by the text: distinct texts get unrelated vectors."""
    return np.stack([np.random.default_rng(zlib.crc32(t.encode())).standard_normal(dim) for t in texts]
                    ).astype(np.float32) if texts else np.zeros((0, dim), np.float32)


def stub_embedder(dim=16, texts_per_call=2048):
    return retro.CallableEmbedder(lambda texts: random_vectors(texts, dim), dim, name="stub-random",
                                  config={"dim": dim}, texts_per_call=texts_per_call)


def random_docs(rng, lengths):
    return [rng.integers(0, 256, n).astype(np.uint8) for n in lengths]


def reference_search(db, queries, k, exclude=None, metric="ip"):
    """Brute force over every chunk of db: ids [n, k] and scores, excluded documents' chunks left out."""
    all_ids = np.arange(db.num_chunks)
    emb = db.embeddings(all_ids).astype(np.float64)
    docs = db.chunk_docs(all_ids)[0]
    q = np.asarray(queries, np.float64)
    s = q @ emb.T if metric == "ip" else -((q[:, None, :] - emb[None]) ** 2).sum(-1)
    if exclude is not None:
        ex = np.asarray(exclude).reshape(len(q), -1)
        for i in range(len(q)):
            s[i, np.isin(docs, ex[i][ex[i] >= 0])] = -np.inf
    order = np.lexsort((np.broadcast_to(all_ids, s.shape), -s), axis=-1)[:, :k]
    top = np.take_along_axis(s, order, 1)
    ids = np.where(np.isfinite(top), order, -1)
    if ids.shape[1] < k:
        ids = np.concatenate([ids, np.full((len(q), k - ids.shape[1]), -1)], 1)
        top = np.concatenate([top, np.full((len(q), k - top.shape[1]), -np.inf)], 1)
    return ids, np.where(ids >= 0, top, 0)
