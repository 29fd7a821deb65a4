"""backend="hnsw": recall, FIFO eviction through mark_deleted, clear, save/load, options."""

import numpy as np
import pytest

hnswlib = pytest.importorskip("hnswlib")

import kvmemory  # noqa: E402
from kvmemory.backends.hnsw import HnswSegmentIndex  # noqa: E402


def clustered(rng, n, d, clusters=64, sigma=1.0):
    """[n, d] float32: gaussian clusters with overlapping spread, norm ~1."""
    centers = rng.standard_normal((clusters, d))
    x = centers[rng.integers(0, clusters, n)] + sigma * rng.standard_normal((n, d))
    return (x / np.sqrt(d)).astype(np.float32)


def recall(res, ref, k):
    """ann-benchmarks recall: a hit if its true score is within 1e-3 of the true k-th best."""
    kth = ref.scores[..., k - 1:k]
    return ((res.scores >= kth - 1e-3) & res.mask).sum() / ref.mask.sum()


def fill(mem, x, chunk=1000):
    """Add x [B, n, H, d] (as keys and values) in chunks."""
    for i in range(0, x.shape[1], chunk):
        mem.add(x[:, i:i + chunk], x[:, i:i + chunk])


def index_calls(monkeypatch):
    calls = []
    real = HnswSegmentIndex.batch_query
    monkeypatch.setattr(HnswSegmentIndex, "batch_query",
                        lambda self, q, k, threads=1: calls.append(len(q)) or real(self, q, k, threads))
    return calls


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_default_recall(metric, monkeypatch):
    rng = np.random.default_rng(0)
    cap, d, k = 8192, 32, 32
    x = clustered(rng, cap + 256, d)
    keys, q = x[None, :cap, None], x[None, cap:, None]
    mem = kvmemory.Memory(d, capacity=cap, backend="hnsw", metric=metric, exact_below=0)
    ref = kvmemory.Memory(d, capacity=cap, metric=metric)
    fill(mem, keys)
    fill(ref, keys)
    calls = index_calls(monkeypatch)
    res = mem.search(q, k)
    segments = len(mem.backend.segments[0])
    assert segments >= 2 and sum(calls) == 256 * segments   # every query went through hnswlib
    assert recall(res, ref.search(q, k), k) >= 0.9


def attention_like(rng, n, nq, d, clusters=32, shift=3.0):
    """Keys [n, d] and queries [nq, d] shaped like real attention keys (MiniLM layer 5: mean vector
    norm ~7 vs key norms ~9.6): a strong common direction of norm ``shift`` (key norms ~3.2), plus
    clusters with log-normal norms; queries come from the same clusters and point partly against
    the common direction, as MiniLM's do."""
    mu = rng.standard_normal(d)
    mu *= shift / np.linalg.norm(mu)
    centres = rng.standard_normal((clusters, d)) / np.sqrt(d)

    def draw(m):
        x = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, d)) / np.sqrt(d)
        return x * rng.lognormal(0, 0.25, (m, 1))

    return (mu + draw(n)).astype(np.float32), (draw(nq) - 0.5 * mu).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_recall_on_keys_with_a_common_direction(metric):
    # uncentred inner-product graphs navigate badly here: recall@32 was ~0.35 (ip) and ~0.86 (cosine)
    # at the defaults; centring each segment's keys (exact for the ranking) gives ~0.99
    rng = np.random.default_rng(0)
    cap, d, k = 4096, 32, 32
    keys, q = attention_like(rng, cap, 256, d)
    mem = kvmemory.Memory(d, capacity=cap, backend="hnsw", metric=metric, exact_below=0)
    ref = kvmemory.Memory(d, capacity=cap, metric=metric)
    fill(mem, keys[None, :, None], chunk=512)
    fill(ref, keys[None, :, None], chunk=512)
    assert all(ix.built for s in mem.backend.segments[0] for ix in s.indexes)
    res = mem.search(q[None, :, None], k)
    assert recall(res, ref.search(q[None, :, None], k), k) >= 0.95


def test_centre_is_fixed_from_a_sample_before_the_graph_is_built(monkeypatch):
    rng = np.random.default_rng(9)
    d = 8
    x = (rng.standard_normal((1, 700, 1, d)) + 5).astype(np.float32)
    mem = kvmemory.Memory(d, capacity=1000, backend="hnsw", segment_size=1000, exact_below=0)
    ref = kvmemory.Memory(d, capacity=1000)
    calls = index_calls(monkeypatch)
    for i in range(0, 700, 100):
        mem.add(x[:, i:i + 100], x[:, i:i + 100])
        ref.add(x[:, i:i + 100], x[:, i:i + 100])
        ix = mem.backend.segments[0][0].indexes[0]
        n = i + 100
        # not ready (the segment is searched exactly) until centre_sample (512) keys are in
        assert ix.built == (n >= 512) and ix.ready() == ix.built
        res, want = mem.search(x[:, :20] - 5, 10), ref.search(x[:, :20] - 5, 10)
        assert (len(calls) > 0) == ix.built
        if not ix.built:
            np.testing.assert_array_equal(res.ids, want.ids)
    np.testing.assert_allclose(ix.centre, x[0, :600, 0].mean(0), rtol=1e-5)   # the keys in when it was built
    # the graph holds centred keys; the ring (and so every result) holds the keys as given
    np.testing.assert_allclose(ix.index.get_items([3])[0], x[0, 3, 0] - ix.centre, atol=1e-5)
    # l2 is translation invariant: no centring, built at once
    l2 = HnswSegmentIndex("l2", d, 1000, {"M": 8, "ef_construction": 16})
    assert l2.built and not l2.centre.any()


def test_fifo_churn_returns_live_stored_entries():
    rng = np.random.default_rng(1)
    B, H, d, cap, k = 2, 2, 16, 1024, 16
    n = 4600                              # > 4x capacity
    x = clustered(rng, B * n * H, d).reshape(B, n, H, d)
    mem = kvmemory.Memory(d, capacity=cap, num_heads=H, batch_size=B, backend="hnsw",
                          segment_size=300, exact_below=0)
    ref = kvmemory.Memory(d, capacity=cap, num_heads=H, batch_size=B)
    pos, recalls = 0, []
    for step in (1, 299, 300, 301, 555, 1024, 2000, 97):
        mem.add(x[:, pos:pos + step], x[:, pos:pos + step])
        ref.add(x[:, pos:pos + step], x[:, pos:pos + step])
        pos += step
        q = x[:, rng.integers(0, pos, 20)] + 0.01
        res = mem.search(q, k)
        ids = res.ids[res.mask]
        assert (ids >= max(pos - cap, 0)).all() and (ids < pos).all()
        b, t, h, _ = np.nonzero(res.mask)
        np.testing.assert_array_equal(res.keys[res.mask], x[b, res.ids[res.mask], h])
        np.testing.assert_array_equal(res.mask.sum(-1), min(k, pos))
        recalls.append(recall(res, ref.search(q, k), k))
        for row in mem.backend.segments:
            first = row[0]
            live_from = max(pos - cap, 0) - first.start
            if live_from > 0:
                assert all(ix.removed == live_from for ix in first.indexes)
    assert pos == 4577 and np.mean(recalls) >= 0.9


def test_mark_deleted_is_applied_in_hnswlib():
    rng = np.random.default_rng(2)
    d, cap = 8, 100
    x = clustered(rng, 130, d)[None, :, None]
    mem = kvmemory.Memory(d, capacity=cap, backend="hnsw", segment_size=50, exact_below=0)
    fill(mem, x, chunk=10)                # ids 30..129 live: segment [0, 50) has 30 evicted
    seg = mem.backend.segments[0][0]
    assert (seg.start, seg.count, seg.removed_below) == (0, 50, 30)
    ix = seg.indexes[0]
    labels, _ = ix.index.knn_query(x[0, :5, 0], k=20, num_threads=1)
    assert (labels >= 30).all()
    with pytest.raises(RuntimeError):     # only 20 live entries are left to return
        ix.index.knn_query(x[0, :5, 0], k=21, num_threads=1)
    with pytest.raises(RuntimeError):
        ix.index.get_items([29])
    # a query equal to an evicted key still only gets live ids
    res = mem.search(x[:, :30], 5)
    assert (res.ids >= 30).all()


def test_k_larger_than_segments_hold():
    rng = np.random.default_rng(3)
    d = 8
    x = clustered(rng, 137, d)[None, :, None]
    mem = kvmemory.Memory(d, capacity=100, backend="hnsw", segment_size=7, exact_below=0)
    ref = kvmemory.Memory(d, capacity=100)
    fill(mem, x, chunk=13)
    fill(ref, x, chunk=13)
    q = x[:, :9] + 0.1
    for k in (1, 5, 6, 64, 100, 150):
        res, want = mem.search(q, k), ref.search(q, k)
        np.testing.assert_array_equal(res.mask, want.mask)
        np.testing.assert_allclose(res.scores, want.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("cap,seg", [(3, 1), (5, 2), (17, 3), (50, 7), (50, 50)])
def test_tiny_capacities_match_exact(metric, cap, seg):
    rng = np.random.default_rng(cap * 100 + seg)
    d = 4
    mem = kvmemory.Memory(d, capacity=cap, num_heads=2, batch_size=2, backend="hnsw",
                          metric=metric, segment_size=seg, exact_below=0)
    ref = kvmemory.Memory(d, capacity=cap, num_heads=2, batch_size=2, metric=metric)
    for step in range(12):
        t = int(rng.integers(0, 2 * cap + 2))
        x = rng.standard_normal((2, t, 2, d)).astype(np.float32)
        if step % 4 == 1:
            x[:] = 0                          # duplicates and zero keys
        mem.add(x, x)
        ref.add(x, x)
        if step == 6:
            mem.clear([1])
            ref.clear([1])
        q = rng.standard_normal((2, 3, 2, d)).astype(np.float32)
        k = int(rng.integers(1, cap + 3))
        res, want = mem.search(q, k), ref.search(q, k)
        np.testing.assert_array_equal(res.mask, want.mask)
        np.testing.assert_allclose(res.scores, want.scores, rtol=1e-4, atol=1e-4)


def test_brute_fallback_matches_exact():
    rng = np.random.default_rng(4)
    for metric in ("ip", "l2"):
        ix = HnswSegmentIndex(metric, 8, 64, {"M": 4, "ef_construction": 8})
        keys = rng.standard_normal((60, 8)).astype(np.float32)
        ix.add(keys)
        ix.remove_below(10)
        q = rng.standard_normal((5, 8)).astype(np.float32)
        s = q @ keys.T if metric == "ip" else -((q[:, None] - keys) ** 2).sum(-1)
        s[:, :10] = -np.inf
        pos, scores = ix._brute(q, 7)
        np.testing.assert_array_equal(pos, np.argsort(-s, 1, kind="stable")[:, :7])
        np.testing.assert_allclose(scores, np.take_along_axis(s, pos, 1), rtol=1e-5, atol=1e-5)


def test_clear():
    rng = np.random.default_rng(5)
    d = 8
    x = clustered(rng, 2 * 300, d).reshape(2, 300, 1, d)
    mem = kvmemory.Memory(d, capacity=200, batch_size=2, backend="hnsw", segment_size=64, exact_below=0)
    fill(mem, x, chunk=70)
    mem.clear([0])
    assert mem.backend.segments[0] == [] and mem.backend.segments[1]
    res = mem.search(x[:, :4], 8)
    assert not res.mask[0].any() and res.mask[1].all()
    mem.add(x[:, :10], x[:, :10])
    res = mem.search(x[:, :4], 8)
    assert set(res.ids[0].ravel()) <= set(range(10)) and res.mask[0].all()
    assert (res.ids[1] >= 110).all()


def test_save_load_round_trip_and_continue(tmp_path):
    rng = np.random.default_rng(6)
    B, H, d, cap, k = 2, 2, 16, 600, 10
    x = clustered(rng, B * 3000 * H, d).reshape(B, 3000, H, d)
    opts = dict(capacity=cap, num_heads=H, batch_size=B, metric="cosine")
    mem = kvmemory.Memory(d, backend="hnsw", segment_size=256, exact_below=0, M=8, ef=40, **opts)
    ref = kvmemory.Memory(d, **opts)
    fill(mem, x[:, :1500], chunk=170)
    fill(ref, x[:, :1500], chunk=170)
    mem.save(tmp_path / "m.kvm")
    loaded = kvmemory.Memory.load(tmp_path / "m.kvm")
    assert loaded.options == mem.options and loaded.options["M"] == 8 and loaded.options["ef"] == 40
    q = x[:, rng.integers(900, 1500, 16)] + 0.05
    a, b = mem.search(q, k), loaded.search(q, k)
    np.testing.assert_array_equal(a.ids, b.ids)
    for sa, sb in zip(mem.backend.segments[0] + mem.backend.segments[1],
                      loaded.backend.segments[0] + loaded.backend.segments[1]):
        assert (sa.start, sa.count, sa.removed_below) == (sb.start, sb.count, sb.removed_below)
        assert [i.removed for i in sa.indexes] == [i.removed for i in sb.indexes]
        assert [i.built for i in sa.indexes] == [i.built for i in sb.indexes]
        for ia, ib in zip(sa.indexes, sb.indexes):
            np.testing.assert_array_equal(ia.centre, ib.centre)
        assert [i.index.ef for i in sb.indexes] == [40] * H
    # keep going: FIFO must continue from where the saved memory stopped (marks and all)
    for mm in (loaded, ref):
        fill(mm, x[:, 1500:2777], chunk=333)
    q = x[:, rng.integers(2200, 2777, 16)] + 0.05
    res = loaded.search(q, k)
    assert (res.ids >= 2777 - cap).all() and (res.ids < 2777).all()
    assert recall(res, ref.search(q, k), k) >= 0.9


@pytest.mark.parametrize("n", [4, 16])      # a key buffer (not built yet) and a built graph
def test_deserialize_rejects_bad_bytes(n):
    build = {"M": 4, "ef_construction": 8}
    ix = HnswSegmentIndex("ip", 4, 16, build)
    ix.add(np.random.default_rng(10).standard_normal((n, 4)).astype(np.float32))
    assert ix.built == (n == 16)
    data = ix.serialize()
    nan_centre = data[:40] + np.float32(np.nan).tobytes() + data[44:]
    for bad, args in ((data[:10], (4, 16)), (b"X" + data[1:], (4, 16)), (data[:-5], (4, 16)),
                      (data, (5, 16)), (data, (4, 3)), (nan_centre, (4, 16))):
        with pytest.raises(ValueError):
            HnswSegmentIndex.deserialize(bad, "ip", *args, build)
    with pytest.raises(ValueError):        # an l2 index is never centred
        HnswSegmentIndex.deserialize(data, "l2", 4, 16, build)
    back = HnswSegmentIndex.deserialize(data, "ip", 4, 16, build)
    assert (back.built, back.count, back.removed) == (ix.built, n, 0)
    np.testing.assert_array_equal(back.centre, ix.centre)


def test_reads_version_1_files(tmp_path):
    # version 1 (before centring): header (magic, dim, count, removed) + an uncentred hnswlib graph
    import struct
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((30, 4)).astype(np.float32)
    g = hnswlib.Index(space="ip", dim=4)
    g.init_index(max_elements=32, M=4, ef_construction=8)
    g.add_items(keys, np.arange(30))
    g.mark_deleted(0)
    g.save_index(str(tmp_path / "g.bin"))
    data = struct.pack("<8sqqq", b"KVHNSW1\0", 4, 30, 1) + (tmp_path / "g.bin").read_bytes()
    ix = HnswSegmentIndex.deserialize(data, "ip", 4, 32, {"M": 4, "ef_construction": 8})
    assert ix.built and not ix.centre.any() and (ix.count, ix.removed) == (30, 1)
    ix.set_query_arguments(ef=40)
    s = keys[:3] @ keys.T
    s[:, 0] = -np.inf
    pos, scores = ix.batch_query(keys[:3], 5)
    np.testing.assert_array_equal(pos, np.argsort(-s, 1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(s, pos, 1), rtol=1e-5, atol=1e-5)
    ix.add(keys[:2])                      # keeps going, uncentred
    assert ix.count == 32


@pytest.mark.parametrize("opt,value", [("M", 1), ("M", 0), ("M", True), ("M", 2.5), ("M", "16"),
                                       ("ef_construction", 0), ("ef", 0), ("ef", -3)])
def test_bad_options(opt, value):
    with pytest.raises(ValueError, match=opt):
        kvmemory.Memory(8, capacity=64, backend="hnsw", **{opt: value})


def test_search_options():
    mem = kvmemory.Memory(8, capacity=64, backend="hnsw", segment_size=16, exact_below=0)
    assert mem.options["M"] == 16 and mem.options["ef_construction"] == 64 and mem.options["ef"] == 64
    x = np.random.default_rng(7).standard_normal((1, 40, 1, 8)).astype(np.float32)
    mem.add(x, x)
    mem.set_search_options(ef=200)
    assert all(ix.index.ef == 200 for s in mem.backend.segments[0] for ix in s.indexes)
    with pytest.raises(ValueError, match="ef"):
        mem.set_search_options(ef=0)
    assert mem.options["ef"] == 200
    with pytest.raises(ValueError, match="nprobe"):
        mem.set_search_options(nprobe=3)


def test_unreachable_live_entries_fall_back_to_exact():
    # many duplicate keys + a sparse graph + most entries deleted: hnswlib reaches fewer than k live ones
    rng = np.random.default_rng(8)
    keys = np.zeros((3000, 8), np.float32)
    keys[::3] = rng.standard_normal((1000, 8))
    ix = HnswSegmentIndex("l2", 8, 3000, {"M": 2, "ef_construction": 16})
    ix.add(keys)
    ix.remove_below(2900)
    ix.set_query_arguments(ef=10)
    q = rng.standard_normal((20, 8)).astype(np.float32)
    with pytest.raises(RuntimeError):
        ix.index.knn_query(q, k=100, num_threads=1)
    pos, scores = ix.batch_query(q, 100)
    assert pos.shape == scores.shape == (20, 100)
    np.testing.assert_allclose(scores, -((q[:, None] - keys[pos]) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    assert all(set(p) == set(range(2900, 3000)) for p in pos.tolist())
