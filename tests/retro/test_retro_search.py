"""Search semantics: exact over shards == one exact index; exclusion is a filter; ANN indices within it."""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmemory import retro
from kvmemory.retro.index import INDEX_TYPES
from retro_helpers import random_docs, reference_search, stub_embedder

C = 8


def make_db(tmp_path, lengths, shard_chunks, seed=0, name="db", **kw):
    rng = np.random.default_rng(seed)
    docs = random_docs(rng, lengths)
    path = tmp_path / name
    retro.build(docs, path, embedder=stub_embedder(), chunk_len=C, shard_chunks=shard_chunks, **kw)
    return retro.RetroDatabase(path, embedder=stub_embedder()), docs


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(0, 60), min_size=1, max_size=8), shard_chunks=st.integers(1, 12),
       k=st.integers(1, 6), seed=st.integers(0, 1000), metric=st.sampled_from(["ip", "l2"]))
def test_sharded_exact_search_with_exclusion_is_one_exact_index(tmp_path_factory, lengths, shard_chunks, k, seed,
                                                                 metric):
    tmp = tmp_path_factory.mktemp("db")
    sharded, _ = make_db(tmp, lengths, shard_chunks, seed, "sharded", metric=metric)
    single, _ = make_db(tmp, lengths, 10_000, seed, "single", metric=metric)
    assert len(single.shards) <= 1 and sharded.num_chunks == single.num_chunks
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    n_docs = len(lengths)
    # per query: none, one document, two documents (one possibly not in the store), -1 padding
    exclude = rng.integers(-1, n_docs + 2, (7, 2))
    ref_ids, ref_scores = reference_search(single, q, k, exclude, metric)
    for db in (sharded, single):
        hits = db.search(q, k, exclude_doc_ids=exclude)
        assert hits.ids.tolist() == ref_ids.tolist()
        np.testing.assert_allclose(hits.scores, ref_scores, rtol=1e-5, atol=1e-4)
        assert (hits.mask == (ref_ids >= 0)).all() and (hits.scores[~hits.mask] == 0).all()


def test_exclusion_is_a_filter_not_skip_first(tmp_path):
    # one document whose chunks are all near the query: a "drop the first hit" filter would return the rest
    db, _ = make_db(tmp_path, [40, 40, 40], 100)
    target = db.doc_chunks(1)
    q = db.embeddings(target[:1])
    hits = db.search(q, 3, exclude_doc_ids=[1])
    assert hits.mask.all() and not np.isin(hits.ids, target).any()
    hits = db.search(q, 3)
    assert hits.ids[0, 0] == target[0]


def test_too_few_left_after_exclusion_are_masked(tmp_path):
    db, _ = make_db(tmp_path, [3 * C, 2 * C], 100)
    hits = db.search(np.ones((1, 16), np.float32), 5, exclude_doc_ids=np.array([[0]]))
    assert hits.mask.tolist() == [[True, True, False, False, False]]
    assert hits.ids[0, 2:].tolist() == [-1, -1, -1] and (hits.scores[0, 2:] == 0).all()
    nb = db.neighbours(np.ones((1, 16), np.float32), 5, exclude_doc_ids=[0])
    assert not nb.token_mask[0, 2:].any() and (nb.doc_ids[0, 2:] == -1).all()


def test_neighbours_carry_their_continuation(tmp_path):
    db, docs = make_db(tmp_path, [2 * C + 3, C], 100)
    chunks = db.doc_chunks(0)                                  # 3 chunks: full, full, 3 tokens
    q = db.embeddings(chunks)
    nb = db.neighbours(q, 1)
    assert nb.ids[:, 0].tolist() == chunks.tolist()           # each chunk's nearest is itself (no exclusion)
    d = docs[0]
    assert nb.tokens[0, 0].tolist() == d[:2 * C].tolist() and nb.token_mask[0, 0].all()
    assert nb.tokens[1, 0, :C + 3].tolist() == d[C:].tolist()
    assert nb.token_mask[1, 0].tolist() == [True] * (C + 3) + [False] * (C - 3)
    # the last chunk of a document has no continuation
    assert nb.token_mask[2, 0].tolist() == [True] * 3 + [False] * (2 * C - 3)
    assert (nb.tokens[2, 0, 3:] == 0).all()
    assert nb.tokens.shape == (3, 1, 2 * C) and nb.doc_ids[:, 0].tolist() == [0, 0, 0]


def test_text_and_token_queries_embed_like_the_build(tmp_path):
    db, docs = make_db(tmp_path, [3 * C], 100)
    chunk = docs[0][:C]
    by_tokens = db.search([chunk], 1)
    by_text = db.search([bytes(chunk).decode("utf-8", errors="replace")], 1)
    assert by_tokens.ids[0, 0] == by_text.ids[0, 0] == 0
    assert by_tokens.scores[0, 0] == pytest.approx(float(db.embeddings([0])[0] @ db.embeddings([0])[0]), rel=1e-5)


ANN = [t for t, spec in INDEX_TYPES.items() if spec is not None]
LIB = {"faiss": "faiss", "scann": "scann", "hnsw": "hnswlib"}


@pytest.fixture(scope="module")
def ann_docs():
    rng = np.random.default_rng(7)
    lengths = rng.integers(20 * C, 200 * C, 30)
    return [rng.integers(0, 256, int(n)).astype(np.uint8) for n in lengths]


@pytest.mark.parametrize("index", ANN)
def test_ann_index_filters_scores_exactly_and_recalls(tmp_path, ann_docs, index):
    if importlib.util.find_spec(LIB[INDEX_TYPES[index][0]]) is None:
        pytest.skip(f"{index} not installed")
    opts = {"tree_min_size": 512} if index == "scann" else {}
    kw = dict(embedder=retro.NgramHashEmbedder(dim=32), chunk_len=C, shard_chunks=1500)
    retro.build(ann_docs, tmp_path / "exact", **kw)
    retro.build(ann_docs, tmp_path / "ann", index=index, index_options=opts, **kw)
    exact, ann = retro.RetroDatabase(tmp_path / "exact"), retro.RetroDatabase(tmp_path / "ann")
    assert len(ann.shards) > 1
    ids = np.random.default_rng(1).choice(ann.num_chunks, 200, replace=False)
    q = ann.embeddings(ids)
    own = ann.chunk_docs(ids)[0]
    ref = exact.search(q, 2, exclude_doc_ids=own)
    got = ann.search(q, 2, exclude_doc_ids=own)
    assert not (ann.chunk_docs(got.ids)[0] == own[:, None])[got.mask].any()      # never the excluded document
    emb = ann.embeddings(got.ids)
    np.testing.assert_allclose(got.scores, np.einsum("nkd,nd->nk", emb, q) * got.mask, rtol=1e-4, atol=1e-5)
    recall = np.mean([len(set(a[a >= 0]) & set(b)) / 2 for a, b in zip(got.ids, ref.ids)])
    assert recall >= 0.7, recall
    # a reloaded index answers the same
    again = retro.RetroDatabase(tmp_path / "ann").search(q, 2, exclude_doc_ids=own)
    assert again.ids.tolist() == got.ids.tolist()


def test_bad_queries_are_refused(tmp_path):
    db, _ = make_db(tmp_path, [3 * C], 100)
    with pytest.raises(ValueError, match=r"\[n, 16\]"):
        db.search(np.zeros((2, 8), np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        db.search(np.full((1, 16), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="k must be"):
        db.search(np.zeros((1, 16), np.float32), 0)
    with pytest.raises(ValueError, match="exclude_doc_ids"):
        db.search(np.zeros((2, 16), np.float32), 2, exclude_doc_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=">= -1"):
        db.search(np.zeros((1, 16), np.float32), 2, exclude_doc_ids=[-5])
    with pytest.raises(ValueError, match="chunk ids"):
        db.chunk_tokens(np.array([db.num_chunks]))


def test_ties_are_broken_by_id_in_sharded_and_single_stores(tmp_path):
    doc = np.random.default_rng(2).integers(0, 256, 3 * C).astype(np.uint8)
    docs = [doc] * 5                                     # identical chunks: identical embeddings, tied scores
    for name, shard_chunks in (("sharded", 4), ("single", 100)):
        retro.build(docs, tmp_path / name, embedder=stub_embedder(), chunk_len=C, shard_chunks=shard_chunks)
    q = retro.RetroDatabase(tmp_path / "single", embedder=stub_embedder()).embeddings([1])
    for name in ("sharded", "single"):
        db = retro.RetroDatabase(tmp_path / name, embedder=stub_embedder())
        assert db.search(q, 4, exclude_doc_ids=[0]).ids.tolist() == [[4, 7, 10, 13]]
