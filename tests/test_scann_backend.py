"""backend="scann": recall, padding, FIFO churn, clear, persistence, options."""

import numpy as np
import pytest

pytest.importorskip("scann")

import kvmemory  # noqa: E402

D = 32


def clustered(rng, n, d=D, clusters=64, noise=0.35):
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d)).astype(np.float32)
    return x.astype(np.float32)


def recall_at_k(queries, keys, ids, k, metric):
    """ann-benchmarks recall: a returned id counts if its true score is within 1e-3 of the k-th best."""
    if metric == "l2":
        s = -((queries ** 2).sum(1)[:, None] - 2 * queries @ keys.T + (keys ** 2).sum(1))
    else:
        s = queries @ keys.T
    kth = -np.sort(-s, 1)[:, k - 1:k]
    got = np.take_along_axis(s, np.maximum(ids, 0), 1)
    return float(((got >= kth - 1e-3) & (ids >= 0)).sum() / ids.size)


def memory(capacity, **kw):
    opts = dict(exact_below=0, num_threads=2)
    opts.update(kw)
    return kvmemory.Memory(D, capacity=capacity, backend="scann", **opts)


def add(m, x, start=0, chunk=1024):
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk][None, :, None]
        m.add(part, part + 0.5)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_default_recall(rng, metric):
    C, k = 8192, 32
    x = clustered(rng, C + 256)
    keys, queries = x[:C], x[C:]
    m = memory(C, metric=metric, tree_min_size=1024)
    add(m, keys)
    assert m.backend.segments[0][0].indexes[0].built > 0      # the tree path really ran
    res = m.search(queries[None, :, None], k)
    ids = res.ids[0, :, 0]
    if metric == "cosine":
        keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    assert recall_at_k(queries, keys, ids, k, "l2" if metric == "l2" else "ip") >= 0.9
    assert np.all(res.mask == (res.ids >= 0))


@pytest.mark.parametrize("n", [1, 5, 40, 100])
def test_no_padding_leaks_when_k_exceeds_held(rng, n):
    m = memory(64, segment_size=16, tree_min_size=32)
    x = clustered(rng, n)
    add(m, x, chunk=7)
    res = m.search(clustered(rng, 3)[None, :, None], 80)
    held = min(n, 64)
    assert np.all(np.isfinite(res.scores))
    assert np.all((res.ids >= 0).sum(-1) == held)
    assert np.all(res.ids[..., held:] == -1) and not res.mask[..., held:].any()
    live = res.ids[..., :held]
    assert np.all((live >= n - held) & (live < n))
    assert all(len(set(r)) == held for r in live.reshape(-1, held).tolist())


def test_index_pads_nan_with_minus_one(rng):
    from kvmemory.backends.scann import ScannSegmentIndex
    index = ScannSegmentIndex("ip", D, 100, memory(100).backend.library_build)
    index.add(clustered(rng, 3))
    ids, scores = index.batch_query(clustered(rng, 2), 10)
    assert ids.shape == scores.shape == (2, 10) and np.all(ids[:, 3:] == -1) and sorted(ids[0, :3]) == [0, 1, 2]
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()


def test_fifo_churn(rng):
    C, k = 1024, 16
    m = memory(C, segment_size=256, tree_min_size=64, num_heads=2, batch_size=2)
    stored = clustered(rng, 4 * C * 4).reshape(2, 4 * C, 2, D)
    for i in range(0, 4 * C, 150):
        m.add(stored[:, i:i + 150], stored[:, i:i + 150])
        count = min(i + 150, 4 * C)
        res = m.search(clustered(rng, 4 * 5).reshape(2, 5, 2, D), k)
        ids = res.ids
        assert np.all((ids >= max(0, count - C)) & (ids < count) | (ids == -1))
        assert np.all(ids[..., :min(k, count)] >= 0)
        b, t, h, j = np.nonzero(ids >= 0)
        np.testing.assert_array_equal(res.keys[b, t, h, j], stored[b, ids[b, t, h, j], h])


def test_clear(rng):
    m = memory(1024, segment_size=256, tree_min_size=64, batch_size=2)
    x = clustered(rng, 2 * 600).reshape(2, 600, 1, D)
    m.add(x, x)
    m.clear([0])
    assert m.backend.counts().tolist() == [0, 600]
    res = m.search(x[:, :4], 8)
    assert np.all(res.ids[0] == -1) and np.all(res.ids[1] >= 0)
    m.add(x[:, :10], x[:, :10])
    res = m.search(x[:, :4], 8)
    assert np.all((res.ids[0] >= 0) == (np.arange(8) < 10)[None, None]) or np.all(res.ids[0] >= 0)
    assert res.ids[0].max() < 10


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_save_load_continues(rng, tmp_path, metric):
    C = 1024
    m = memory(C, metric=metric, segment_size=256, tree_min_size=64, num_leaves=8,
               num_leaves_to_search=8, batch_size=2, num_heads=2)
    x = clustered(rng, 2 * 4000 * 2).reshape(2, 4000, 2, D)
    m.add(x[:, :1500], x[:, :1500])           # the newest segment is partly filled and a tree
    q = clustered(rng, 2 * 6 * 2).reshape(2, 6, 2, D)
    m.save(tmp_path / "m.npz")
    m2 = kvmemory.Memory.load(tmp_path / "m.npz")
    assert m2.options == m.options
    r1, r2 = m.search(q, 10), m2.search(q, 10)
    np.testing.assert_array_equal(r1.ids, r2.ids)
    for i in range(1500, 4000, 333):
        m.add(x[:, i:i + 333], x[:, i:i + 333])
        m2.add(x[:, i:i + 333], x[:, i:i + 333])
        r1, r2 = m.search(q, 10), m2.search(q, 10)
        np.testing.assert_array_equal(r1.ids, r2.ids)
        np.testing.assert_array_equal(m.backend.counts(), m2.backend.counts())
    assert r2.ids.min() >= 4000 - C


def test_corrupt_index_state_raises():
    from kvmemory.backends.scann import ScannSegmentIndex
    with pytest.raises(ValueError):
        ScannSegmentIndex.deserialize(b"not an npz", "ip", D, 16, {})


@pytest.mark.parametrize("bad", [
    {"num_leaves": 0}, {"num_leaves": 2.5}, {"tree_min_size": -1}, {"rebuild_factor": 1.0},
    {"rebuild_factor": "2"}, {"dimensions_per_block": 0}, {"dimensions_per_block": D + 1},
    {"anisotropic_quantization_threshold": -0.2}, {"training_sample_size": 0},
    {"hash_training_sample_size": True}, {"num_leaves_to_search": 0}, {"reorder": 0}, {"bogus": 1},
])
def test_bad_options(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        memory(256, **bad)


def test_bad_search_options_leave_options_unchanged():
    m = memory(256)
    before = m.options
    with pytest.raises(ValueError, match="reorder"):
        m.set_search_options(reorder=-3)
    assert m.options == before
    m.set_search_options(reorder=64, num_leaves_to_search=3)
    assert m.options["reorder"] == 64


def test_anisotropic_rejected_for_l2():
    with pytest.raises(ValueError, match="anisotropic_quantization_threshold"):
        memory(256, metric="l2", anisotropic_quantization_threshold=0.2)


def test_numpy_int_options_are_saved_as_python_ints(rng, tmp_path):
    i = np.int64
    m = memory(512, segment_size=256, num_leaves=i(4), tree_min_size=i(64), training_sample_size=i(1000),
               hash_training_sample_size=i(500), dimensions_per_block=i(2), num_leaves_to_search=i(2),
               reorder=i(50))
    add(m, clustered(rng, 300))
    m.set_search_options(reorder=np.int32(300))
    ints = ("num_leaves", "tree_min_size", "training_sample_size", "hash_training_sample_size",
            "dimensions_per_block", "num_leaves_to_search", "reorder")
    assert all(type(m.options[name]) is int for name in ints), {n: type(m.options[n]) for n in ints}
    assert m.options["reorder"] == 300
    m.save(tmp_path / "m.npz")                                   # json.dumps: numpy ints crashed it
    assert kvmemory.Memory.load(tmp_path / "m.npz").options == m.options


def test_search_options_none_restores_default():
    defaults = memory(1024).options
    assert defaults["num_leaves_to_search"] == 3 and defaults["reorder"] == 256   # ceil(round(sqrt(512)) / 8)
    assert memory(1024, reorder=None, num_leaves_to_search=None).options == defaults
    m = memory(1024, reorder=64, num_leaves_to_search=2)
    m.set_search_options(reorder=None, num_leaves_to_search=None)
    assert m.options == defaults


def _saved_tree_segment(rng):
    """(serialized ScaNN segment index with a tree, its build options)."""
    from kvmemory.backends.scann import ScannSegmentIndex
    build = memory(256, segment_size=256, tree_min_size=64).backend.library_build
    index = ScannSegmentIndex("ip", D, 256, build)
    index.add(clustered(rng, 100))
    assert index.built
    return index.serialize(), build


def _npz_bytes(arrays):
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_saved_assets_cannot_point_outside_the_file(rng, tmp_path):
    """A crafted pbtxt naming a readable file elsewhere: ScaNN would load it; we refuse."""
    import io
    from kvmemory.backends.scann import ScannSegmentIndex
    data, build = _saved_tree_segment(rng)
    z = dict(np.load(io.BytesIO(data)))
    outside = tmp_path / "elsewhere.npy"
    z.pop("scann/dataset.npy").tofile(outside)
    text = bytes(z["scann/scann_assets.pbtxt"]).decode().replace('"dataset.npy"', f'"{outside}"')
    z["scann/scann_assets.pbtxt"] = np.frombuffer(text.encode(), np.uint8)
    with pytest.raises(ValueError, match="asset path .*elsewhere.npy' is not one of the saved files"):
        ScannSegmentIndex.deserialize(_npz_bytes(z), "ip", D, 256, build)


@pytest.mark.parametrize("damage", ["no assets", "garbage assets", "undecodable assets", "no dataset",
                                    "torn partitioner"])
def test_corrupt_scann_assets_raise_value_error(rng, damage):
    import io
    from kvmemory.backends.scann import ScannSegmentIndex
    data, build = _saved_tree_segment(rng)
    assert ScannSegmentIndex.deserialize(data, "ip", D, 256, build).searcher.size() == 100
    z = dict(np.load(io.BytesIO(data)))
    assets = "scann/scann_assets.pbtxt"
    if damage == "no assets":
        del z[assets]
    elif damage == "garbage assets":
        z[assets] = np.frombuffer(b"assets { nonsense", np.uint8)
    elif damage == "undecodable assets":
        z[assets] = np.frombuffer(b"\xff\xfe\x00", np.uint8)
    elif damage == "no dataset":
        del z["scann/dataset.npy"]
    else:
        z["scann/serialized_partitioner.pb"] = z["scann/serialized_partitioner.pb"][:50]
    with pytest.raises(ValueError, match="saved scann index is corrupt"):
        ScannSegmentIndex.deserialize(_npz_bytes(z), "ip", D, 256, build)
