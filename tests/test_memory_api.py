"""The Memory API on the exact backend: shapes, FIFO, ids, masks, clearing, metrics, dtypes."""

import subprocess
import sys
import weakref

import numpy as np
import pytest

import kvmemory
from checks import check_result
from conftest import backend_options, installed_backends
from reference import ReferenceMemory


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_result_shapes_and_defaults(rng):
    mem = kvmemory.Memory(key_dim=8, value_dim=3, capacity=16, num_heads=2, batch_size=3)
    assert (mem.key_dim, mem.value_dim, mem.capacity, mem.num_heads, mem.batch_size) == (8, 3, 16, 2, 3)
    assert mem.metric == "ip" and mem.backend_name == "exact"
    mem.add(rand(rng, 3, 5, 2, 8), rand(rng, 3, 5, 2, 3))
    res = mem.search(rand(rng, 3, 4, 2, 8), k=6)
    assert res.keys.shape == (3, 4, 2, 6, 8) and res.values.shape == (3, 4, 2, 6, 3)
    assert res.scores.shape == res.ids.shape == res.mask.shape == (3, 4, 2, 6)
    assert res.ids.dtype == np.int64 and res.mask.dtype == bool and res.scores.dtype == np.float32
    assert mem.size.dtype == np.int64 and mem.size.tolist() == [5, 5, 5]
    default = kvmemory.Memory(key_dim=4)
    assert (default.value_dim, default.num_heads, default.batch_size) == (4, 1, 1)


def test_fifo_keeps_exactly_the_last_capacity_entries(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=5, batch_size=2)
    keys = rand(rng, 2, 13, 1, 4)
    for t in range(13):  # one token at a time, wrapping the ring twice
        mem.add(keys[:, t:t + 1], keys[:, t:t + 1])
    res = mem.search(keys[:, :1], k=10)
    assert mem.size.tolist() == [5, 5]
    assert sorted(res.ids[0, 0, 0][res.mask[0, 0, 0]].tolist()) == [8, 9, 10, 11, 12]
    np.testing.assert_array_equal(res.mask[0, 0, 0], [True] * 5 + [False] * 5)


def test_add_larger_than_capacity_keeps_its_last_tokens(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=4)
    keys = rand(rng, 1, 10, 1, 4)
    mem.add(keys, keys * 2)
    res = mem.search(keys[:, -1:], k=8)
    got = res.ids[0, 0, 0][res.mask[0, 0, 0]]
    assert sorted(got.tolist()) == [6, 7, 8, 9]
    for j, i in enumerate(got):
        np.testing.assert_array_equal(res.keys[0, 0, 0, j], keys[0, i, 0])
        np.testing.assert_array_equal(res.values[0, 0, 0, j], 2 * keys[0, i, 0])


def test_k_beyond_size_is_masked_not_filled(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=100, batch_size=2)
    mem.add(rand(rng, 2, 3, 1, 4), rand(rng, 2, 3, 1, 4))
    mem.clear(1)
    res = mem.search(rand(rng, 2, 1, 1, 4), k=5)
    assert res.mask[0].sum() == 3 and res.mask[1].sum() == 0
    assert (res.ids[0, 0, 0, 3:] == -1).all() and (res.ids[1] == -1).all()
    assert not res.keys[1].any() and not res.values[1].any() and not res.scores[1].any()


def test_clear_forms_and_ids_restart(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=8, batch_size=4)
    keys = rand(rng, 4, 6, 1, 4)
    mem.add(keys, keys)
    mem.clear(0)
    mem.clear([2])
    mem.clear(np.array([False, False, False, True]))
    assert mem.size.tolist() == [0, 6, 0, 0]
    mem.add(keys[:, :2], keys[:, :2])
    res = mem.search(keys[:, :1], k=8)
    assert sorted(res.ids[0, 0, 0][res.mask[0, 0, 0]].tolist()) == [0, 1]
    assert sorted(res.ids[1, 0, 0][res.mask[1, 0, 0]].tolist()) == list(range(8))
    mem.clear()
    assert mem.size.tolist() == [0, 0, 0, 0]
    mem.clear([])  # no rows: nothing happens
    assert mem.size.tolist() == [0, 0, 0, 0]


def test_heads_are_independent_indices(rng):
    mem = kvmemory.Memory(key_dim=2, capacity=4, num_heads=2)
    keys = np.array([[[[1, 0], [0, 1]], [[0, 1], [1, 0]]]], np.float32)  # [1, 2 tokens, 2 heads, 2]
    mem.add(keys, keys)
    q = np.array([[[[1, 0], [1, 0]]]], np.float32)
    res = mem.search(q, k=1)
    assert res.ids[0, 0, 0, 0] == 0 and res.ids[0, 0, 1, 0] == 1


@pytest.mark.parametrize("metric", kvmemory.METRICS)
@pytest.mark.parametrize("block_bytes, num_threads", [(64 << 20, 1), (4096, 1), (4096, 2)])
def test_exact_matches_reference(metric, block_bytes, num_threads, rng):
    """Also with a tiny score budget, so the blocked merge across key blocks is exercised."""
    mem = kvmemory.Memory(key_dim=8, value_dim=2, capacity=300, num_heads=2, batch_size=2,
                          metric=metric, block_bytes=block_bytes, num_threads=num_threads)
    ref = ReferenceMemory(2, 300, metric)
    for tokens in (100, 250, 7):
        keys, values = rand(rng, 2, tokens, 2, 8), rand(rng, 2, tokens, 2, 2)
        mem.add(keys, values)
        ref.add(keys, values)
    mem.clear(1)
    ref.clear([1])
    keys, values = rand(rng, 2, 40, 2, 8), rand(rng, 2, 40, 2, 2)
    mem.add(keys, values)
    ref.add(keys, values)
    queries = rand(rng, 2, 5, 2, 8)
    check_result(mem.search(queries, k=50), ref, queries, 50, exact=True)


def test_two_stage_topk_is_exact_on_large_blocks(rng):
    """Blocks wide enough for the group-maxima stage, with planted best keys."""
    from kvmemory.backends.topk import blocked_topk

    q = rand(rng, 3, 7, 16)
    keys = rand(rng, 3, 20000, 16)
    n_valid = np.array([40000, 15000, 33])
    keys = np.concatenate([keys, keys], axis=1)
    got, ranked = blocked_topk(q, keys, n_valid, 32, block_bytes=1 << 20, threads=2)
    for g in range(3):
        scores = q[g] @ keys[g, :n_valid[g]].T
        want = np.sort(scores, 1)[:, ::-1][:, :32]
        true = np.take_along_axis(scores, np.where(got[g] < 0, 0, got[g]), 1)
        valid = min(32, n_valid[g])
        got_scores = np.sort(true, 1)[:, ::-1]
        np.testing.assert_allclose(got_scores[:, :valid], want[:, :valid], rtol=1e-5)
        assert (got[g] >= 0).sum(1).tolist() == [valid] * 7
        # the returned ranked scores are those of the returned keys, -inf where none
        np.testing.assert_allclose(ranked[g][got[g] >= 0], true[got[g] >= 0], rtol=1e-5, atol=1e-5)
        assert np.isneginf(ranked[g][got[g] < 0]).all()


def test_blocked_topk_on_worker_threads_matches_brute_force(rng):
    """A search big enough for the worker pool (and one BLAS thread per worker) stays exact, per metric transform."""
    import concurrent.futures

    from kvmemory.backends.topk import PARALLEL_MIN_SCORES, blocked_topk

    G, T, N, k = 5, 300, 4000, 32
    assert G * T * N >= PARALLEL_MIN_SCORES
    q, keys = rand(rng, G, T, 16), rand(rng, G, N, 16)
    n_valid = np.array([4000, 3999, 1500, 31, 0])
    bias = np.abs(rand(rng, G, N))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got, ranked = blocked_topk(q, keys, n_valid, k, 2.0, bias, mapper=lambda f, xs: list(pool.map(f, xs)),
                                   threads=2)
    for g in range(G):
        n = n_valid[g]
        valid = min(k, n)
        assert (got[g] >= 0).sum(1).tolist() == [valid] * T
        if n == 0:
            continue
        scores = 2 * q[g] @ keys[g, :n].T - bias[g, :n]
        want = np.sort(scores, 1)[:, ::-1][:, :valid]
        np.testing.assert_allclose(np.sort(ranked[g], 1)[:, ::-1][:, :valid], want, rtol=1e-5, atol=1e-4)
        true = np.take_along_axis(scores, np.where(got[g] < 0, 0, got[g]), 1)
        np.testing.assert_allclose(ranked[g][got[g] >= 0], true[got[g] >= 0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_are_converted(dtype, rng):
    mem = kvmemory.Memory(key_dim=4, capacity=8)
    keys = rand(rng, 1, 3, 1, 4).astype(dtype)
    mem.add(keys, keys)
    res = mem.search(keys[:, :1], k=1)
    assert res.keys.dtype == np.float32
    np.testing.assert_array_equal(res.keys[0, 0, 0, 0], keys[0, 0, 0].astype(np.float32))


def test_lists_are_accepted():
    mem = kvmemory.Memory(key_dim=2, capacity=4)
    mem.add([[[[1.0, 0.0]]]], [[[[2.0, 3.0]]]])
    res = mem.search([[[[1.0, 0.0]]]], k=1)
    assert res.values[0, 0, 0, 0].tolist() == [2.0, 3.0]


def test_zero_token_add_and_search(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=8, num_heads=2)
    mem.add(np.zeros((1, 0, 2, 4), np.float32), np.zeros((1, 0, 2, 4), np.float32))
    assert mem.size.tolist() == [0]
    res = mem.search(np.zeros((1, 0, 2, 4), np.float32), k=3)
    assert res.ids.shape == (1, 0, 2, 3)


def test_add_costs_no_reallocation(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=8)
    ring = mem.backend.ring
    buffers = (ring.keys, ring.values)
    for _ in range(5):
        mem.add(rand(rng, 1, 5, 1, 4), rand(rng, 1, 5, 1, 4))
    assert ring.keys is buffers[0] and ring.values is buffers[1]


def test_available_backends_lists_all_builtin():
    names = kvmemory.available_backends()
    assert {"exact", "faiss", "scann", "hnsw", "torch"} <= set(names)
    assert names["exact"] is True


def test_import_pulls_in_no_optional_library():
    code = ("import sys, kvmemory; kvmemory.available_backends(); m = kvmemory.Memory(4); "
            "heavy = [n for n in ('faiss', 'scann', 'hnswlib', 'torch', 'jax', 'tensorflow') if n in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_repr_names_backend_and_sizes(rng):
    mem = kvmemory.Memory(key_dim=4, capacity=8, batch_size=2)
    mem.add(rand(rng, 2, 3, 1, 4), rand(rng, 2, 3, 1, 4))
    assert "backend='exact'" in repr(mem) and "size=[3, 3]" in repr(mem)


def test_register_backend_by_dotted_path(rng):
    kvmemory.register_backend("exact-alias", "kvmemory.backends.exact:ExactBackend")
    mem = kvmemory.Memory(key_dim=4, backend="exact-alias")
    assert type(mem.backend).__name__ == "ExactBackend"
    with pytest.raises(ValueError, match="module:Class"):
        kvmemory.register_backend("bad", "no_colon_here")


@pytest.mark.parametrize("backend", installed_backends())
def test_search_without_entries_matches_full_search(backend, rng):
    mem = kvmemory.Memory(key_dim=8, value_dim=5, capacity=60, num_heads=2, batch_size=2, backend=backend,
                          **backend_options(backend, 60))
    keys = rand(rng, 2, 90, 2, 8)
    for t in range(0, 90, 30):
        mem.add(keys[:, t:t + 30], rand(rng, 2, 30, 2, 5))
    mem.clear([1])
    mem.add(keys[:1, :7].repeat(2, 0), rand(rng, 2, 7, 2, 5))
    q = rand(rng, 2, 6, 2, 8)
    full, lean = mem.search(q, 12), mem.search(q, 12, with_entries=False)
    assert lean.keys is None and lean.values is None
    assert mem.search(q, 12, with_entries=np.False_).keys is None     # numpy bools are bools
    for a, b in ((full.ids, lean.ids), (full.scores, lean.scores), (full.mask, lean.mask)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(lean.mask)[1].sum(-1).max() == 7


def test_parallel_gather_equals_serial(rng, monkeypatch):
    """Large gathers are split over the pool: each part must land in its own slots, masked ones zero."""
    from kvmemory.backends import host

    def filled(threads):
        mem = kvmemory.Memory(key_dim=8, value_dim=3, capacity=50, num_heads=2, batch_size=2, num_threads=threads)
        for t in range(0, 80, 40):   # wraps the ring
            mem.add(keys[:, t:t + 40], values[:, t:t + 40])
        mem.clear([1])
        mem.add(keys[:, :5], values[:, :5])
        return mem

    keys, values, q = rand(rng, 2, 80, 2, 8), rand(rng, 2, 80, 2, 3), rand(rng, 2, 9, 2, 8)
    serial = filled(1).search(q, 20)
    monkeypatch.setattr(host, "GATHER_PART_BYTES", 1)   # every search splits into num_threads parts
    parallel = filled(3).search(q, 20)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)
    assert not parallel.keys[~parallel.mask].any() and not parallel.values[~parallel.mask].any()
    b, t, h, j = np.nonzero(parallel.mask)
    assert (b == 1).any() and (~parallel.mask).any()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("hold", ["keys", "values", "view", "torch"])
def test_results_stay_valid_and_their_buffer_is_reused_only_once_dropped(hold, threads, rng, monkeypatch):
    """Gathered keys/values share one buffer that a later search reuses only when no array of it is alive."""
    from kvmemory.backends import host
    monkeypatch.setattr(host, "GATHER_PART_BYTES", 1 if threads > 1 else 1 << 40)   # threads > 1: split gathers
    mem = kvmemory.Memory(key_dim=8, value_dim=4, capacity=64, num_heads=2, batch_size=2, num_threads=threads)
    mem.add(rand(rng, 2, 64, 2, 8), rand(rng, 2, 64, 2, 4))
    q1, q2 = rand(rng, 2, 5, 2, 8), rand(rng, 2, 5, 2, 8)
    first = mem.search(q1, 6)
    first_keys = first.keys.copy()
    if hold == "torch":
        torch = pytest.importorskip("torch")
        held = torch.from_numpy(first.keys)
    else:
        held = {"keys": first.keys, "values": first.values, "view": first.values[:, 1:, :, ::2].T}[hold]
    held_array = held.numpy() if hold == "torch" else held          # a numpy view of what is held
    want = held_array.copy()
    del first
    second = mem.search(q2, 6)                       # the first result lives on through `held`
    assert not np.shares_memory(second.keys, held_array) and not np.shares_memory(second.values, held_array)
    np.testing.assert_array_equal(held_array, want)
    del held, held_array, second
    free = mem.backend.ring.results._free
    assert len(free) == 1
    spare = weakref.ref(free[0])
    third = mem.search(q1, 6)                        # nothing of the earlier results is alive: a buffer is reused
    assert spare() is not None and np.shares_memory(third.keys, spare()) and np.shares_memory(third.values, spare())
    np.testing.assert_array_equal(third.keys, first_keys)
    assert mem.backend.ring.results._free == []              # lent out again


def test_a_much_smaller_search_does_not_keep_the_big_buffer(rng):
    mem = kvmemory.Memory(key_dim=8, capacity=64, num_heads=2, batch_size=2)
    mem.add(rand(rng, 2, 64, 2, 8), rand(rng, 2, 64, 2, 8))
    mem.search(rand(rng, 2, 40, 2, 8), 16)
    big = mem.backend.ring.results._free[0].size
    mem.search(rand(rng, 2, 2, 2, 8), 16)
    assert mem.backend.ring.results._free[0].size < big / 2


@pytest.mark.parametrize("backend", installed_backends())
def test_zero_query_tokens_on_every_backend(backend, rng):
    """Also with more threads than indices (each index would be handed the spare threads)."""
    options = backend_options(backend, 300)
    if "num_threads" in options:     # segmented: one segment, four threads
        options.update(num_threads=4, segment_size=300)
    mem = kvmemory.Memory(key_dim=8, capacity=300, num_heads=1, backend=backend, **options)
    x = rand(rng, 1, 300, 1, 8)
    mem.add(x, x)
    for with_entries in (True, False):
        res = mem.search(np.zeros((1, 0, 1, 8), np.float32), k=5, with_entries=with_entries)
        assert res.ids.shape == res.mask.shape == (1, 0, 1, 5)
        assert (res.keys is None) == (not with_entries)
