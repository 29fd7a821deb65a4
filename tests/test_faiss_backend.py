"""backend="faiss": exactness of "flat", recall of the approximate indices, FIFO, clear, persistence, options."""

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from kvmemory import Memory  # noqa: E402
from kvmemory.backends.faiss import FaissBackend, has_gpu  # noqa: E402

K = 32
INDEXES = ["flat", "ivf", "hnsw", "IVF16,PQ8x4fs", "HNSW16,Flat"]


def clustered(n, dim, rng, clusters=64):
    """[n, dim] float32: a Gaussian mixture with log-normal norms, like attention keys."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    return (x * rng.lognormal(0, 0.25, (n, 1))).astype(np.float32)


def fill(memories, keys, chunk=512):
    """Add keys [B, N, H, D] to every memory, ``chunk`` tokens at a time (values = keys)."""
    for t in range(0, keys.shape[1], chunk):
        for m in memories:
            m.add(keys[:, t:t + chunk], keys[:, t:t + chunk])


def recall(result, truth, k=K):
    """ann-benchmarks recall: a returned item counts if its true score is within 1e-3 of the true k-th best."""
    kth = truth.scores[..., k - 1:k]
    return float(np.mean(((result.scores >= kth - 1e-3) & result.mask).sum(-1) / k))


def check_live(result, memory, stored):
    """Every returned id is live and its key/value are the ones stored under that id."""
    counts = memory.backend.counts()
    for b in range(memory.batch_size):
        ids = result.ids[b][result.mask[b]]
        assert ((ids >= counts[b] - memory.capacity) & (ids < counts[b])).all()
    b, t, h, j = np.nonzero(result.mask)
    expect = stored[b, result.ids[b, t, h, j], h]
    np.testing.assert_array_equal(result.keys[b, t, h, j], expect)
    np.testing.assert_array_equal(result.values[b, t, h, j], expect)
    assert (result.ids[~result.mask] == -1).all()


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_flat_matches_exact(metric):
    rng = np.random.default_rng(0)
    C, D = 4096, 32
    keys = rng.standard_normal((2, 6000, 2, D)).astype(np.float32)
    queries = rng.standard_normal((2, 64, 2, D)).astype(np.float32)
    m = Memory(D, capacity=C, num_heads=2, batch_size=2, metric=metric, backend="faiss",
               index="flat", segment_size=1000, exact_below=0)
    e = Memory(D, capacity=C, num_heads=2, batch_size=2, metric=metric)
    fill([m, e], keys, chunk=700)
    r, x = m.search(queries, K), e.search(queries, K)
    # faiss scores in its own float32 kernels: equal up to rounding, so near ties may swap
    np.testing.assert_allclose(r.scores, x.scores, rtol=1e-5, atol=1e-4)
    differ = r.ids != x.ids
    assert differ.mean() < 0.01
    np.testing.assert_allclose(r.scores[differ], x.scores[differ], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("index,C", [("ivf", 8192), ("hnsw", 4096)])
@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_default_recall_on_clustered_data(index, C, metric):
    rng = np.random.default_rng(1)
    D = 64
    keys = clustered(int(1.6 * C), D, rng)[None, :, None]
    queries = clustered(256, D, rng)[None, :, None]
    m = Memory(D, capacity=C, metric=metric, backend="faiss", index=index, exact_below=0)
    e = Memory(D, capacity=C, metric=metric)
    fill([m, e], keys)
    segs = m.backend.segments[0]
    assert sum(s.indexes[0].ready() for s in segs) >= 2         # the index path is really taken
    r = m.search(queries, K)
    assert recall(r, e.search(queries, K)) >= 0.9
    check_live(r, m, keys)


@pytest.mark.parametrize("index,floor", [("IVF16,PQ8x4fs", 0.6), ("HNSW16,Flat", 0.9)])
def test_factory_strings_approximate_exact(index, floor):
    rng = np.random.default_rng(2)
    C, D = 4096, 32
    keys = clustered(6000, D, rng)[None, :, None]
    queries = clustered(128, D, rng)[None, :, None]
    m = Memory(D, capacity=C, backend="faiss", index=index, exact_below=0, nprobe=8)
    e = Memory(D, capacity=C)
    fill([m, e], keys)
    assert all(s.indexes[0].ready() for s in m.backend.segments[0][:-1])
    r = m.search(queries, K)
    assert recall(r, e.search(queries, K)) >= floor
    check_live(r, m, keys)


@pytest.mark.parametrize("index", INDEXES)
def test_fifo_churn_never_returns_evicted(index):
    rng = np.random.default_rng(3)
    C, D = 1024, 16
    keys = clustered(4 * C, D, rng)[None, :, None].repeat(2, 2).copy()
    keys[:, :, 1] *= -1
    m = Memory(D, capacity=C, num_heads=2, backend="faiss", index=index, segment_size=256, exact_below=0)
    for t in range(0, 4 * C, 300):
        m.add(keys[:, t:t + 300], keys[:, t:t + 300])
        r = m.search(clustered(16, D, rng)[None, :, None].repeat(2, 2), K)
        check_live(r, m, keys)
        assert r.mask.all()


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_clear(index):
    rng = np.random.default_rng(4)
    D = 16
    keys = clustered(3000, D, rng)[None, :, None].repeat(2, 0)
    m = Memory(D, capacity=1024, batch_size=2, backend="faiss", index=index, segment_size=256, exact_below=0)
    fill([m], keys)
    m.clear(0)
    assert m.backend.counts().tolist() == [0, 3000]
    q = keys[:, :8]
    r = m.search(q, K)
    assert not r.mask[0].any() and r.mask[1].all()
    fill([m], keys[:, :700])
    r = m.search(q, K)
    assert r.mask.all() and (r.ids[0] < 700).all()
    stored = np.concatenate([keys, keys[:, :700]], 1)        # row 1's stream; row 0 restarted at id 0
    stored[0, :700] = keys[0, :700]
    check_live(r, m, stored)


@pytest.mark.parametrize("index", INDEXES)
def test_save_load_continues_fifo(index, tmp_path):
    rng = np.random.default_rng(5)
    C, D = 1024, 16
    keys = clustered(4000, D, rng)[None, :, None]
    queries = clustered(32, D, rng)[None, :, None]
    m = Memory(D, capacity=C, backend="faiss", index=index, segment_size=300, exact_below=0, nprobe=3)
    fill([m], keys[:, :2500], chunk=350)          # a pending newest segment and a part-evicted oldest one
    m.save(tmp_path / "m.npz")
    loaded = Memory.load(tmp_path / "m.npz")
    assert loaded.options == m.options
    np.testing.assert_array_equal(m.search(queries, K).ids, loaded.search(queries, K).ids)
    fill([m, loaded], keys[:, 2500:], chunk=350)
    a, b = m.search(queries, K), loaded.search(queries, K)
    check_live(b, loaded, keys)
    if "HNSW" in index.upper():     # new nodes' levels come from an RNG faiss does not save
        assert recall(b, a) >= 0.9
    else:
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw", "IVF4,Flat"])
@pytest.mark.parametrize("capacity,segment_size", [(3, 1), (5, 2), (17, 4), (50, 7), (50, 50)])
def test_tiny_capacities(index, capacity, segment_size):
    rng = np.random.default_rng(capacity)
    D = 4
    m = Memory(D, capacity=capacity, backend="faiss", index=index, segment_size=segment_size, exact_below=0)
    stored = np.zeros((1, 0, 1, D), np.float32)
    for n in [1, 2, 1, 5, 3, 60, 1]:
        keys = rng.standard_normal((1, n, 1, D)).astype(np.float32)
        m.add(keys, keys)
        stored = np.concatenate([stored, keys], 1)
        for k in (1, 3, 64):
            r = m.search(rng.standard_normal((1, 3, 1, D)).astype(np.float32), k)
            assert r.ids.shape == (1, 3, 1, k)
            check_live(r, m, stored)
            assert r.mask.sum(-1).max() <= min(capacity, stored.shape[1])


def test_untrainable_ivf_is_searched_exactly():
    m = Memory(8, capacity=40, backend="faiss", index="ivf", nlist=32, segment_size=20, exact_below=0)
    keys = np.random.default_rng(6).standard_normal((1, 70, 1, 8)).astype(np.float32)
    m.add(keys, keys)
    assert not any(s.indexes[0].ready() for s in m.backend.segments[0])
    e = Memory(8, capacity=40)
    e.add(keys, keys)
    np.testing.assert_array_equal(m.search(keys[:, :5], 10).ids, e.search(keys[:, :5], 10).ids)


def test_search_leaves_omp_threads_alone():
    before = faiss.omp_get_max_threads()
    m = Memory(8, capacity=4096, backend="faiss", index="hnsw", exact_below=0, num_threads=1)
    keys = np.random.default_rng(7).standard_normal((1, 4096, 1, 8)).astype(np.float32)
    m.add(keys, keys)
    m.search(keys[:, :10], 5)
    assert faiss.omp_get_max_threads() == before


def test_defaults_and_search_options():
    C = 65536
    m = Memory(64, capacity=C, backend="faiss")
    o = m.options
    S = C // 2                                                  # SegmentedBackend: capacity // 2
    nlist = max(1, min(round(4 * np.sqrt(S)), S // 39))         # ~4 sqrt(S), >= 39 keys per list
    assert o["index"] == "ivf" and o["segment_size"] == S == 32768 and o["device"] == "auto"
    assert o["nlist"] == nlist == 724
    assert o["nprobe"] == min(nlist, max(16, round(3 * np.sqrt(nlist)))) == 81   # ~3 sqrt(nlist), >= 16
    assert o["ef_search"] == 64
    m.set_search_options(nprobe=5)
    assert m.options["nprobe"] == 5
    with pytest.raises(ValueError, match="nprobe"):
        m.set_search_options(nprobe=0)
    with pytest.raises(ValueError, match="valid search options"):
        m.set_search_options(efSearch=3)
    assert m.options["nprobe"] == 5
    m.set_search_options(nprobe=None)
    assert m.options["nprobe"] == 81


@pytest.mark.parametrize("index", ["IDMap,Flat", "IDMap2,Flat", "IDMap,IVF4,Flat", "L2norm,IDMap2,Flat"])
def test_idmap_factory_strings_rejected_at_construction(index):
    # their add() always fails (add_with_ids only): it must not first fail inside Memory.add
    with pytest.raises(ValueError, match="index=.*IDMap"):
        Memory(8, capacity=64, backend="faiss", index=index)


def _segment_index(index="ivf", span=400, dim=8, **build):
    from kvmemory.backends.faiss import FaissSegmentIndex
    build = {"index": index, "nlist": 4, "M": 32, "ef_construction": 40, "device": "cpu", **build}
    return FaissSegmentIndex("ip", dim, span, build), build


def test_load_pending_checks_buffered_key_count():
    from kvmemory.backends.faiss import FaissSegmentIndex
    index, build = _segment_index()
    index.add(np.random.default_rng(8).standard_normal((100, 8)).astype(np.float32))
    assert not index.ready()                                    # buffered: trains at 39 * nlist = 156
    data = index.serialize()
    loaded = FaissSegmentIndex.deserialize(data, "ip", 8, 400, build)
    assert loaded.count == 100 and np.concatenate(loaded.pending).shape == (100, 8)
    for bad in (data[:-4 * 8], data + bytes(4 * 8), data[:-2]):   # one key short, one key extra, torn
        with pytest.raises(ValueError, match="expected 100"):
            FaissSegmentIndex.deserialize(bad, "ip", 8, 400, build)


@pytest.mark.parametrize("state,count,removed", [(1, 5, 6), (2, 5, 6), (1, 401, 0), (0, 5, -1), (2, -1, -1)])
def test_load_rejects_counts_that_do_not_fit(state, count, removed):
    from kvmemory.backends.faiss import FaissSegmentIndex
    index, build = _segment_index("flat")
    index.add(np.ones((5, 8), np.float32))
    body = index.serialize()[40:] if state == 0 else bytes(4 * 8 * max(count, 0)) if state == 1 else b""
    with pytest.raises(ValueError, match="saved faiss"):                # a version 1 header (no magic)
        FaissSegmentIndex.deserialize(np.array([state, count, removed], np.int64).tobytes() + body,
                                      "ip", 8, 400, build)


def test_gpu_resources_made_once_under_concurrent_first_use(monkeypatch):
    import threading
    import time
    from kvmemory.backends import faiss as backend

    made = []

    class FakeResources:
        def __init__(self):
            made.append(self)
            time.sleep(0.02)                                    # widen the race window

    monkeypatch.setattr(backend, "_gpu", {})
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
    got = []
    threads = [threading.Thread(target=lambda: got.append(backend._gpu_resources())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert all(r is got[0][0] and lock is got[0][1] for r, lock in got)


def test_gpu_calls_hold_the_resource_lock(monkeypatch):
    """Without a GPU: fake the GPU calls, check each runs under the shared resource lock."""
    from kvmemory.backends import faiss as backend

    lock = backend.threading.Lock()
    calls = []

    def held(name, result):
        def fn(*args):
            calls.append((name, lock.locked()))
            return result(*args)
        return fn

    class FakeSpace:
        set_index_parameter = staticmethod(held("set_parameter", lambda *a: None))

    monkeypatch.setattr(backend, "_gpu", {"res": object(), "lock": lock})
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", held("cpu_to_gpu", lambda res, dev, index: index), raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", held("gpu_to_cpu", lambda index: index), raising=False)
    monkeypatch.setattr(faiss, "GpuParameterSpace", FakeSpace, raising=False)
    index, build = _segment_index("flat", device="cuda")
    index.add(np.ones((5, 8), np.float32))
    index.set_query_arguments(nprobe=3)
    index.serialize()
    assert [name for name, _ in calls] == ["cpu_to_gpu", "set_parameter", "gpu_to_cpu"]
    assert all(was_held for _, was_held in calls), calls
    assert not lock.locked()


@pytest.mark.parametrize("options,match", [
    ({"nlist": 0}, "nlist"), ({"nlist": 2.5}, "nlist"), ({"ef_search": 0}, "ef_search"),
    ({"ef_construction": 0}, "ef_construction"), ({"nprobe": -1}, "nprobe"), ({"M": 1}, "M"),
    ({"index": "IVF-nonsense"}, "index"), ({"index": 3}, "index"), ({"device": "tpu"}, "device"),
    ({"segment_size": -1}, "segment_size"), ({"efSearch": 10}, "valid options"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        Memory(8, capacity=64, backend="faiss", **options)


@pytest.mark.skipif(has_gpu(), reason="this faiss has GPU support")
def test_cuda_without_gpu_support_raises():
    with pytest.raises(ValueError, match="GPU"):
        Memory(8, capacity=64, backend="faiss", device="cuda")
    assert Memory(8, capacity=64, backend="faiss").backend.device == "cpu"
    assert isinstance(Memory(8, capacity=64, backend="faiss").backend, FaissBackend)


def offset_clustered(n, dim, rng, scale=10.0):
    """Clustered keys [n, dim] all shifted by one random offset of norm ~scale sqrt(dim): a strong common direction."""
    return clustered(n, dim, rng) + scale * rng.standard_normal(dim).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_hnsw_centres_keys_sharing_a_direction(metric, monkeypatch):
    from kvmemory.backends import faiss as backend
    C, D = 4096, 32

    def run():
        rng = np.random.default_rng(9)
        keys = offset_clustered(int(1.75 * C), D, rng)[None, :, None]
        queries = clustered(256, D, rng)[None, :, None]
        m = Memory(D, capacity=C, metric=metric, backend="faiss", index="hnsw", exact_below=0)
        e = Memory(D, capacity=C, metric=metric)
        fill([m, e], keys)
        assert all(s.indexes[0].ready() for s in m.backend.segments[0])     # the graphs are searched
        r = m.search(queries, K)
        return m, keys, queries, r, recall(r, e.search(queries, K))

    m, keys, queries, r, centred = run()
    assert centred >= 0.9
    assert all(s.indexes[0].centre is not None for s in m.backend.segments[0])
    check_live(r, m, keys)
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True) if metric == "cosine" else queries
    k = r.keys / np.linalg.norm(r.keys, axis=-1, keepdims=True) if metric == "cosine" else r.keys
    np.testing.assert_allclose(r.scores, np.einsum("bthd,bthkd->bthk", q, k), rtol=1e-5, atol=1e-4)
    if metric == "ip":                      # the same graphs over the raw keys lose most of the top-k
        monkeypatch.setattr(backend, "centres", lambda metric, build: False)
        assert run()[-1] < 0.75


def test_hnsw_centre_save_load(tmp_path):
    from kvmemory.backends.faiss import FaissSegmentIndex, make_index
    rng = np.random.default_rng(10)
    keys, queries = offset_clustered(1000, 8, rng), clustered(20, 8, rng)
    index, build = _segment_index("hnsw", span=1000)
    index.add(keys[:300])
    assert not index.ready() and index.centre is None               # buffering the first min(span, 512)
    loaded = FaissSegmentIndex.deserialize(index.serialize(), "ip", 8, 1000, build)
    for part in (keys[300:600], keys[600:]):                       # the centre: the 600 keys buffered at 512
        loaded.add(part)
        index.add(part)
    assert index.ready() and loaded.ready()
    np.testing.assert_array_equal(index.centre, keys[:600].mean(0, dtype=np.float64).astype(np.float32))
    np.testing.assert_array_equal(loaded.centre, index.centre)
    data = index.serialize()
    loaded = FaissSegmentIndex.deserialize(data, "ip", 8, 1000, build)
    np.testing.assert_array_equal(loaded.centre, index.centre)
    for a, b in zip(index.batch_query(queries, K), loaded.batch_query(queries, K)):
        np.testing.assert_array_equal(a, b)
    ids, scores = loaded.batch_query(queries, K)
    np.testing.assert_allclose(scores, np.einsum("td,tkd->tk", queries, keys[ids]), rtol=1e-5, atol=1e-4)

    header = 40                                                         # magic, state, count, removed, centred
    bad_centre = data[:header] + np.full(8, np.nan, "<f4").tobytes() + data[header + 32:]
    uncentred = data[:32] + bytes(8) + data[header + 32:]              # centred=0 for a trained hnsw ip index
    for bad, match in [(bad_centre, "non-finite centre"), (uncentred, "centred=0, expected 1"),
                       (data[:header + 16], "truncated")]:
        with pytest.raises(ValueError, match=match):
            FaissSegmentIndex.deserialize(bad, "ip", 8, 1000, build)
    with pytest.raises(ValueError, match="centred=1, expected 0"):    # l2 and flat/ivf are never centred
        FaissSegmentIndex.deserialize(data, "l2", 8, 1000, build)
    assert FaissSegmentIndex("l2", 8, 1000, build).ready()

    # version 1 (no magic, no centre): a trained hnsw index loads uncentred, with exact scores
    old = make_index("ip", 8, build)
    old.add(keys)
    v1 = np.array([0, 1000, 0], np.int64).tobytes() + faiss.serialize_index(old).tobytes()
    loaded = FaissSegmentIndex.deserialize(v1, "ip", 8, 1000, build)
    assert loaded.ready() and loaded.centre is None
    ids, scores = loaded.batch_query(queries, K)
    np.testing.assert_allclose(scores, np.einsum("td,tkd->tk", queries, keys[ids]), rtol=1e-5, atol=1e-4)
