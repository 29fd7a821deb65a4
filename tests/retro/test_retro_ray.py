"""The build on a local 2-CPU Ray instance: same store as the single-process build, shards on 2 workers."""

import importlib.util
import os

import numpy as np
import pytest

from kvmemory import retro

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs kvmemory[ray]")


def test_two_ray_workers_build_what_one_process_builds(tmp_path):
    rng = np.random.default_rng(5)
    docs = [retro.Document(f"d{i}.py", tokens=rng.integers(32, 127, int(n)).astype(np.uint8))
            for i, n in enumerate(rng.integers(100, 2000, 24))]
    kw = dict(embedder="ngram-hash", embedder_options={"dim": 32}, chunk_len=16, shard_chunks=200)
    retro.build(docs, tmp_path / "local", **kw)
    report = retro.build(docs, tmp_path / "ray", workers=2, **kw)
    pids = {s["worker_pid"] for s in report["shards_built"]}
    assert len(pids) == 2 and os.getpid() not in pids                     # both workers built shards
    local, ray_db = retro.RetroDatabase(tmp_path / "local"), retro.RetroDatabase(tmp_path / "ray")
    assert [s["input_hash"] for s in local.manifest["shards"]] == [s["input_hash"] for s in ray_db.manifest["shards"]]
    ids = np.arange(local.num_chunks)
    assert np.array_equal(local.embeddings(ids), ray_db.embeddings(ids))
    assert np.array_equal(local.chunk_tokens(ids)[0], ray_db.chunk_tokens(ids)[0])
    q = local.embeddings(ids[::7])
    own = local.chunk_docs(ids[::7])[0]
    assert np.array_equal(local.search(q, 2, own).ids, ray_db.search(q, 2, own).ids)
