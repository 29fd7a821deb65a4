"""The store: self-describing, checked on load, never half-written; bad input refused."""

import json
import os

import numpy as np
import pytest

from kvmemory import retro
from kvmemory.retro import store as st
from retro_helpers import random_docs, stub_embedder

C = 8


@pytest.fixture
def built(tmp_path):
    docs = random_docs(np.random.default_rng(0), [30, 50, 20])
    path = tmp_path / "db"
    retro.build(docs, path, embedder=stub_embedder(), chunk_len=C, shard_chunks=5)
    return path


def shard_file(path, name):
    return path / "shards" / "shard-00000" / name


def test_manifest_describes_the_store(built):
    m = json.loads((built / "manifest.json").read_text())
    assert m["format"] == "kvmemory.retro" and m["version"] == 1 and m["chunk_len"] == C
    assert m["embedder"]["name"] == "stub-random" and m["embedder"]["dim"] == 16 and m["embedder"]["hash"]
    assert m["index"]["type"] == "exact" and m["pending"] == [] and m["token_dtype"] == "|u1"
    assert m["counts"] == {"shards": 3, "docs": 3, "chunks": 4 + 7 + 3, "tokens": 100}
    meta = json.loads(shard_file(built, "shard.json").read_text())
    assert set(meta["files"]) == {"tokens.npy", "lengths.npy", "doc_ids.npy", "positions.npy", "embeddings.npy",
                                  "docs.npy", "docs.json"}
    db = retro.RetroDatabase(built, embedder=stub_embedder())
    assert isinstance(db.shards[0].embeddings, np.memmap) and isinstance(db.shards[0].tokens, np.memmap)
    assert db.doc_names() == ["0", "1", "2"]


def test_corrupt_manifest(built):
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        retro.RetroDatabase(built)


def test_manifest_of_another_version(built):
    m = json.loads((built / "manifest.json").read_text())
    m["version"] = 99
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="version 99"):
        retro.RetroDatabase(built)


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        retro.RetroDatabase(tmp_path)


def test_truncated_npy(built):
    f = shard_file(built, "embeddings.npy")
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        retro.RetroDatabase(built, verify=False)


def test_corrupt_npy_fails_its_checksum(built):
    f = shard_file(built, "tokens.npy")
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC-32"):
        retro.RetroDatabase(built)
    retro.RetroDatabase(built, verify=False)      # sizes and headers still fine: opens unverified


def test_npy_with_another_shape(built):
    f = shard_file(built, "lengths.npy")
    arr = np.load(f)
    np.save(f, arr.astype(np.int16))               # a valid .npy, but not what the shard manifest records
    meta = json.loads(shard_file(built, "shard.json").read_text())
    meta["files"]["lengths.npy"]["bytes"] = os.path.getsize(f)
    shard_file(built, "shard.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="holds <i2"):
        retro.RetroDatabase(built, verify=False)


def test_missing_shard(built):
    import shutil
    shutil.rmtree(built / "shards" / "shard-00001")
    with pytest.raises(ValueError, match="shard-00001.*missing"):
        retro.RetroDatabase(built)


def test_store_refuses_another_embedder(built):
    with pytest.raises(ValueError, match="stub-random.*ngram-hash"):
        retro.RetroDatabase(built, embedder=retro.NgramHashEmbedder(dim=16))
    same_name_other_config = retro.CallableEmbedder(lambda t: np.zeros((len(t), 16)), 16, name="stub-random",
                                                    config={"dim": 16, "seed": 1})
    with pytest.raises(ValueError, match="config hash"):
        retro.RetroDatabase(built, embedder=same_name_other_config)
    with pytest.raises(ValueError, match="embedder"):          # nor extended with one
        retro.build([np.arange(9, dtype=np.uint8)], built, embedder=retro.NgramHashEmbedder(dim=16), chunk_len=C,
                    append=True)
    with pytest.raises(ValueError, match="not registered"):     # a callable cannot be remade from the manifest
        retro.RetroDatabase(built).search(["text"], 1)


def test_empty_and_short_documents(tmp_path):
    retro.build([b"", b"abc", b"", b"x" * (C + 1)], tmp_path / "db", embedder=stub_embedder(), chunk_len=C)
    db = retro.RetroDatabase(tmp_path / "db", embedder=stub_embedder())
    assert db.num_docs == 4 and db.num_chunks == 3
    assert db.doc_chunks(0).tolist() == [] and db.doc_chunks(1).tolist() == [0] and db.doc_chunks(3).tolist() == [1, 2]
    tokens, mask = db.chunk_tokens(np.array([0]), continuation=False)
    assert mask.sum() == 3 and bytes(tokens[0][mask[0]]) == b"abc"
    assert db.text(0) == "abc"


def test_only_empty_documents(tmp_path):
    retro.build([b"", b""], tmp_path / "db", embedder=stub_embedder(), chunk_len=C)
    db = retro.RetroDatabase(tmp_path / "db", embedder=stub_embedder())
    assert db.num_chunks == 0 and db.num_docs == 2
    hits = db.search(np.ones((2, 16), np.float32), 3)
    assert not hits.mask.any() and (hits.ids == -1).all()


@pytest.mark.parametrize("kwargs, err, match", [
    ({"embedder": "no-such-embedder"}, ValueError, "embedder must be one of"),
    ({"embedder": 42}, TypeError, "CallableEmbedder"),
    ({"index": "annoy"}, ValueError, "index must be one of"),
    ({"index": "faiss-ivf", "index_options": {"nprobes": 3}}, ValueError, "unknown option"),
    ({"index": "exact", "index_options": {"nprobe": 3}}, ValueError, "takes no options"),
    ({"metric": "cosine"}, ValueError, "metric"),
    ({"shard_chunks": 0}, ValueError, "shard_chunks"),
    ({"workers": -1}, ValueError, "workers"),
    ({"tokenizer": "gpt2"}, ValueError, "tokenizer"),
])
def test_bad_build_options_write_nothing(tmp_path, kwargs, err, match):
    if kwargs.get("index") == "faiss-ivf":
        pytest.importorskip("faiss")
    kwargs = {"embedder": stub_embedder(), **kwargs}
    with pytest.raises(err, match=match):
        retro.build([b"abcdefgh" * 3], tmp_path / "db", chunk_len=C, **kwargs)
    assert not (tmp_path / "db" / "manifest.json").exists()


class BadEmbedder(retro.Embedder):
    name, dim = "bad", 4

    def __init__(self, out):
        self.out = out

    def embed(self, texts):
        return self.out(len(texts))


@pytest.mark.parametrize("out, err, match", [
    (lambda n: np.zeros((n, 3)), ValueError, r"shape \(\d+, 3\)"),
    (lambda n: np.full((n, 4), np.nan), ValueError, "NaN"),
    (lambda n: np.zeros((n, 4), np.int64), TypeError, "float"),
])
def test_bad_embedder_output_leaves_no_shard(tmp_path, out, err, match):
    with pytest.raises(err, match=match):
        retro.build([b"abcdefgh" * 3], tmp_path / "db", embedder=BadEmbedder(out), chunk_len=C)
    assert os.listdir(tmp_path / "db" / "shards") == []
    with pytest.raises(ValueError, match="unfinished build"):
        retro.RetroDatabase(tmp_path / "db")


def test_atomic_json_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    st.atomic_write_json(str(path), {"a": 1})

    def boom(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        st.atomic_write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["x.json"]


def test_embedder_remade_from_the_manifest_with_run_time_options(tmp_path):
    retro.build([b"def f(x):\n    return x\n" * 4], tmp_path / "db", embedder="ngram-hash",
                embedder_options={"dim": 16}, chunk_len=C)
    db = retro.RetroDatabase(tmp_path / "db")
    assert db.search(["def f(x):"], 1).mask.all() and db.embedder.dim == 16
    with pytest.raises(ValueError, match="config hash"):       # an option that changes the vectors is refused
        retro.RetroDatabase(tmp_path / "db", embedder_options={"n": 4}).search(["def f(x):"], 1)
