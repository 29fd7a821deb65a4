"""The build pipeline: resume after a failure inside a shard, no-op reruns, appending documents, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvmemory import retro
from retro_helpers import random_docs, random_vectors

C = 8


class CountingEmbedder(retro.Embedder):
    """The stub embedder that counts its calls and may fail on call number ``fail_at`` (one call per shard)."""

    name, dim = "stub-random", 16

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def config(self):
        return {"dim": 16}

    def embed(self, texts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("worker died")
        return random_vectors(texts)


def docs_(seed=0, n=10):
    return random_docs(np.random.default_rng(seed), np.random.default_rng(seed).integers(10, 40, n))


def arrays(path):
    db = retro.RetroDatabase(path, embedder=CountingEmbedder())
    ids = np.arange(db.num_chunks)
    return db, db.chunk_tokens(ids)[0], db.embeddings(ids), db.chunk_docs(ids)


def test_killed_build_resumes_skipping_finished_shards(tmp_path):
    docs = docs_()
    ref = tmp_path / "ref"
    retro.build(docs, ref, embedder=CountingEmbedder(), chunk_len=C, shard_chunks=6)
    n_shards = len(retro.RetroDatabase(ref, embedder=CountingEmbedder()).shards)
    assert n_shards >= 4
    path = tmp_path / "db"
    with pytest.raises(RuntimeError, match="worker died"):
        retro.build(docs, path, embedder=CountingEmbedder(fail_at=3), chunk_len=C, shard_chunks=6)
    assert sorted(os.listdir(path / "shards")) == ["shard-00000", "shard-00001"]
    with pytest.raises(ValueError, match="unfinished build"):
        retro.RetroDatabase(path)
    os.makedirs(path / "shards" / ".tmp-shard-00002-deadbeef")       # what a kill mid-write leaves
    with pytest.raises(ValueError, match="unfinished build of other documents"):
        retro.build(docs[:-1], path, embedder=CountingEmbedder(), chunk_len=C, shard_chunks=6)
    again = CountingEmbedder()
    report = retro.build(docs, path, embedder=again, chunk_len=C, shard_chunks=6)
    assert again.calls == n_shards - 2
    assert report["shards_skipped"] == ["shard-00000", "shard-00001"]
    assert not any(n.startswith(".tmp") for n in os.listdir(path / "shards"))
    (_, tokens, emb, (docs_of, pos)), (_, tokens0, emb0, (docs0, pos0)) = arrays(path), arrays(ref)
    assert np.array_equal(tokens, tokens0) and np.array_equal(emb, emb0)
    assert np.array_equal(docs_of, docs0) and np.array_equal(pos, pos0)
    # a finished store built again from the same documents does nothing
    idle = CountingEmbedder()
    report = retro.build(docs, path, embedder=idle, chunk_len=C, shard_chunks=6)
    assert idle.calls == 0 and report["shards_built"] == [] and len(report["shards_skipped"]) == n_shards


def test_other_documents_need_append(tmp_path):
    path = tmp_path / "db"
    first, more = docs_(0, 6), docs_(1, 3)
    retro.build(first, path, embedder=CountingEmbedder(), chunk_len=C, shard_chunks=10)
    db = retro.RetroDatabase(path, embedder=CountingEmbedder())
    pre = retro.precompute_neighbours(db, "train", k=2)
    n0, d0 = db.num_chunks, db.num_docs
    old_tokens, old_emb = db.chunk_tokens(np.arange(n0))[0], db.embeddings(np.arange(n0))
    with pytest.raises(ValueError, match="append"):
        retro.build(more, path, embedder=CountingEmbedder(), chunk_len=C, shard_chunks=10)
    with pytest.raises(ValueError, match="chunk_len"):
        retro.build(more, path, embedder=CountingEmbedder(), chunk_len=C + 1, append=True)
    retro.build(more, path, embedder=CountingEmbedder(), chunk_len=C, shard_chunks=10, append=True)
    db = retro.RetroDatabase(path, embedder=CountingEmbedder())
    assert db.num_docs == d0 + 3 and db.num_chunks == n0 + sum(-(-len(d) // C) for d in more)
    # old chunks keep their ids; new documents follow
    assert np.array_equal(db.chunk_tokens(np.arange(n0))[0], old_tokens)
    assert np.array_equal(db.embeddings(np.arange(n0)), old_emb)
    new = db.doc_chunks(d0)
    assert new[0] == n0
    hits = db.search(db.embeddings(new[:1]), 1)
    assert hits.ids[0, 0] == new[0]                     # an added document is found
    with pytest.raises(ValueError, match="another state of the database"):
        retro.load_neighbours(db, "train")
    with pytest.raises(ValueError, match="overwrite"):
        retro.precompute_neighbours(db, "train", k=2)
    assert retro.precompute_neighbours(db, "train", k=2, overwrite=True).ids.shape == (db.num_chunks, 2)
    assert pre.ids.shape == (n0, 2)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "kvmemory.retro", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_build_query_info_precompute(tmp_path):
    src = tmp_path / "docs"
    (src / "pkg").mkdir(parents=True)
    (src / "test").mkdir()
    (src / "pkg" / "a.py").write_text("def parse_args(self):\n    return self.parser.parse_args()\n" * 5)
    (src / "b.py").write_text("class Encoder:\n    def encode(self, obj):\n        return str(obj)\n" * 5)
    (src / "test" / "c.py").write_text("skipped")
    (src / "notes.txt").write_text("not python")
    store = str(tmp_path / "store")
    out = run_cli("build", "--docs", str(src), "--out", store, "--glob", "*.py", "--exclude-dir", "test",
                  "--embedder", "ngram-hash", "--embedder-option", "dim=64", "--chunk-len", "32", "--quiet")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["shards_built"] == 1 and summary["chunks_built"] > 0
    out = run_cli("query", store, "def parse_args(self):", "-k", "2", "--exclude-doc", "b.py", "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert [r["doc_name"] for r in res["neighbours"]] == ["pkg/a.py", "pkg/a.py"]
    out = run_cli("query", store, "def parse_args(self):", "-k", "2", "--exclude-doc", "pkg/a.py", "--json")
    assert [r["doc_name"] for r in json.loads(out.stdout)["neighbours"]] == ["b.py", "b.py"]
    out = run_cli("info", store)
    info = json.loads(out.stdout)
    assert info["docs"] == 2 and info["embedder"]["name"] == "ngram-hash" and info["chunk_len"] == 32
    out = run_cli("precompute", store, "--quiet")
    assert out.returncode == 0 and json.loads(out.stdout)["masked"] == 0
    out = run_cli("query", str(tmp_path / "nowhere"), "x")
    assert out.returncode == 2 and "no manifest.json" in out.stderr
