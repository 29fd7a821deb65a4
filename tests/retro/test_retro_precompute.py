"""Batch precompute of every chunk's neighbours: equal to per-chunk search with exclusion, resumable."""

import numpy as np
import pytest

from kvmemory import retro
from retro_helpers import random_docs, reference_search, stub_embedder

C = 8


@pytest.fixture
def db(tmp_path):
    rng = np.random.default_rng(3)
    retro.build(random_docs(rng, rng.integers(0, 60, 12)), tmp_path / "db", embedder=stub_embedder(), chunk_len=C,
                shard_chunks=9)
    return retro.RetroDatabase(tmp_path / "db", embedder=stub_embedder())


def test_precompute_is_search_with_own_document_excluded(db):
    pre = retro.precompute_neighbours(db, "train", k=3, block_chunks=7)
    ids = np.arange(db.num_chunks)
    own = db.chunk_docs(ids)[0]
    ref_ids, ref_scores = reference_search(db, db.embeddings(ids), 3, own)
    assert pre.ids.tolist() == ref_ids.tolist()
    np.testing.assert_allclose(pre.scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert not (db.chunk_docs(pre.ids)[0] == own[:, None])[pre.mask].any()
    again = retro.load_neighbours(db, "train")
    assert np.array_equal(again.ids, pre.ids) and isinstance(again.ids, np.memmap)


def test_without_exclusion_same_document_neighbours_come_back(db):
    pre = retro.precompute_neighbours(db, "all", k=2, exclude_same_doc=False)
    ids = np.arange(db.num_chunks)
    assert pre.ids.tolist() == reference_search(db, db.embeddings(ids), 2)[0].tolist()
    assert (db.chunk_docs(pre.ids)[0] == db.chunk_docs(ids)[0][:, None]).any()


def test_interrupted_precompute_resumes(db, monkeypatch):
    calls = []
    real = type(db).search

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(type(db), "search", flaky)
    with pytest.raises(KeyboardInterrupt):
        retro.precompute_neighbours(db, "train", k=2, block_chunks=5)
    with pytest.raises(ValueError, match="unfinished"):
        retro.load_neighbours(db, "train")
    calls.clear()
    monkeypatch.setattr(type(db), "search", lambda self, *a, **kw: (calls.append(1), real(self, *a, **kw))[1])
    pre = retro.precompute_neighbours(db, "train", k=2, block_chunks=5)
    blocks = -(-db.num_chunks // 5)
    assert len(calls) == blocks - 2                      # the two finished blocks are not searched again
    monkeypatch.setattr(type(db), "search", real)
    fresh = retro.precompute_neighbours(db, "fresh", k=2, block_chunks=5)
    assert np.array_equal(pre.ids, fresh.ids)
    with pytest.raises(ValueError, match="other settings"):
        retro.precompute_neighbours(db, "train", k=3)
    with pytest.raises(ValueError, match="plain directory name"):
        retro.precompute_neighbours(db, "../x")
