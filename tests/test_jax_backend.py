"""backend="jax" against backend="exact": ring semantics, tiled search, persistence and input checks."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import kvmemory  # noqa: E402
from checks import assert_matches_exact, replay_against_exact, saved_header  # noqa: E402
import kvmemory.backends.base  # noqa: E402
from kvmemory_jax import JaxBackend  # noqa: E402
from kvmemory_jax.retrieve import plan_blocks  # noqa: E402

B, H, C, DK, DV, TQ = 3, 2, 32, 16, 5, 4   # TQ: query tokens of every search (one compile per k)

# options -> the scan tiles they must produce for TQ queries and k = 9 (checked in test_tiling_plans)
TILED = {"cols": {"block_bytes": B * H * TQ * 4 * 12},                # 12 of 32 columns: 3 tiles, the last shifted
         "rows": {"block_bytes": 1},                                  # one query token and m columns per tile
         "bf16": {"score_dtype": "bfloat16", "block_bytes": B * H * TQ * 4 * 20}}


def pair(metric="ip", capacity=C, **options):
    """An exact memory and a jax memory of the same shape."""
    shape = dict(key_dim=DK, value_dim=DV, capacity=capacity, num_heads=H, batch_size=B, metric=metric)
    return kvmemory.Memory(**shape, backend="exact"), kvmemory.Memory(**shape, backend="jax", **options)


def entries(rng, T):
    return (rng.standard_normal((B, T, H, DK)).astype(np.float32),
            rng.standard_normal((B, T, H, DV)).astype(np.float32))


def queries(rng):
    return rng.standard_normal((B, TQ, H, DK)).astype(np.float32)


def assert_matches(exact, res_exact, res_jax, tol=1e-5):
    """Same top-k as the exact backend: masks, scores, ids (ties aside), and each id's stored entry."""
    assert all(isinstance(x, jax.Array) for x in res_jax)
    assert_matches_exact(exact, res_exact, tuple(np.asarray(x) for x in res_jax), tol, id_dtype=np.int32)


@pytest.mark.parametrize("metric, tiling", [(metric, tiling) for metric in kvmemory.METRICS for tiling in (None, "cols")]
                         + [("l2", "rows"), ("cosine", "bf16")])
def test_matches_exact_through_fifo_clears_and_large_k(metric, tiling):
    rng = np.random.default_rng(7)
    exact, mem = pair(metric, **TILED.get(tiling, {}))
    steps = [("add", 5), ("search", 3), ("search", 9), ("add", 20), ("search", 9), ("add", 20),  # wraps
             ("search", 40), ("clear", [1]), ("search", 9), ("add", 70), ("search", 9),          # 70 > C
             ("clear", [0, 2]), ("add", 5), ("search", 9), ("search", 40)]
    replay_against_exact(exact, mem, steps, lambda T: entries(rng, T), lambda: queries(rng), jnp.asarray,
                         lambda res_exact, res: assert_matches(exact, res_exact, res))
    assert mem.backend.counts().dtype == np.int64


def test_tiling_plans():
    """The TILED options really take the multi-tile paths (a shifted last tile, query-token chunks)."""
    G = B * H
    assert plan_blocks(G, TQ, C, 9, TILED["cols"]["block_bytes"]) == (12, TQ)
    assert plan_blocks(G, TQ, C, 9, TILED["rows"]["block_bytes"]) == (9, 1)
    assert plan_blocks(G, TQ, C, 18, TILED["bf16"]["block_bytes"]) == (20, TQ)
    assert plan_blocks(G, TQ, C, 9, 256 << 20) == (C, TQ)


def test_bfloat16_scan_is_rescored_in_float32():
    """bfloat16 scan scores differ from the float32 scores returned: the rescore is what makes them exact."""
    rng = np.random.default_rng(3)
    exact, mem = pair("ip", score_dtype="bfloat16")
    k, v = entries(rng, C)
    exact.add(k, v)
    mem.add(k, v)
    q = queries(rng)
    res = mem.search(q, 9)
    bf16 = jnp.einsum("bthd,bthkd->bthk", jnp.asarray(q, jnp.bfloat16), res.keys.astype(jnp.bfloat16))
    assert not np.allclose(np.asarray(bf16, np.float32), np.asarray(res.scores), atol=1e-5)
    assert_matches(exact, exact.search(q, 9), res)


def test_ids_follow_the_stream_and_evicted_entries_never_return():
    mem = kvmemory.Memory(key_dim=2, capacity=4, batch_size=2, backend="jax")
    # entry i has key (1, i): with ip and query (0, 1) the newest entries score highest
    for start in range(0, 10, 3):
        keys = jnp.stack([jnp.ones(3), jnp.arange(start, start + 3.0)], -1)[None, :, None].repeat(2, 0)
        mem.add(keys, keys)
    res = mem.search(jnp.array([0.0, 1.0]).reshape(1, 1, 1, 2).repeat(2, 0), k=6)
    assert res.ids[0, 0, 0].tolist() == [11, 10, 9, 8, -1, -1]
    assert res.scores[0, 0, 0].tolist() == [11, 10, 9, 8, 0, 0]
    assert res.values[0, 0, 0, :4, 1].tolist() == [11, 10, 9, 8]
    assert res.mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2
    assert mem.size.tolist() == [4, 4] and mem.backend.counts().tolist() == [12, 12]


def test_clear_restarts_ids_and_a_device_mask_stays_on_the_device(monkeypatch):
    mem = kvmemory.Memory(key_dim=2, capacity=4, batch_size=3, backend="jax")
    mem.add(jnp.ones((3, 6, 1, 2)), jnp.ones((3, 6, 1, 2)))
    monkeypatch.setattr(kvmemory.backends.base, "rows_to_mask", lambda *a: pytest.fail("host mask built"))
    mem.clear(jnp.array([True, False, False]))
    assert mem.size.tolist() == [0, 4, 4]
    with pytest.raises(ValueError, match=r"bool mask must have shape \(3,\), got \(2,\)"):
        mem.clear(jnp.array([True, False]))
    monkeypatch.undo()
    mem.clear([2])
    assert mem.size.tolist() == [0, 4, 0]
    mem.add(jnp.ones((3, 1, 1, 2)), jnp.ones((3, 1, 1, 2)))
    res = mem.search(jnp.ones((3, 1, 1, 2)), k=5)
    assert res.ids[0, 0, 0].tolist() == res.ids[2, 0, 0].tolist() == [0, -1, -1, -1, -1]
    assert sorted(res.ids[1, 0, 0, :4].tolist()) == [3, 4, 5, 6]


def test_empty_memory_empty_query_and_no_entries():
    _, mem = pair()
    res = mem.search(jnp.ones((B, TQ, H, DK)), k=3)
    assert res.keys.shape == (B, TQ, H, 3, DK) and res.values.shape == (B, TQ, H, 3, DV)
    assert not res.mask.any() and (np.asarray(res.ids) == -1).all() and not res.scores.any()
    rng = np.random.default_rng(0)
    mem.add(*entries(rng, 5))
    assert mem.search(jnp.ones((B, 0, H, DK)), k=3).ids.shape == (B, 0, H, 3)
    bare = mem.search(queries(rng), k=3, with_entries=False)
    assert bare.keys is None and bare.values is None and bool(bare.mask.all())


def test_ids_wrap_at_the_horizon_and_counts_stay_exact():
    """int32 ids are stream positions modulo 2**31; counts, slots and live entries stay exact across the wrap."""
    rng = np.random.default_rng(5)
    exact, mem = pair("l2")
    exact.add(*entries(rng, C))
    state = dict(exact.backend.state_dict(), counts=np.array([2**33 + 5, 2**31 - 3, 2**31], np.int64))
    exact.backend.load_state_dict(state)
    mem.backend.load_state_dict(state)
    q = queries(rng)
    for step in range(3):           # row 1 crosses the horizon on the first add
        res = mem.search(q, 40)
        assert_matches(exact, exact.search(q, 40), res)
        ids = np.asarray(res.ids)
        assert ids.dtype == np.int32 and ids[np.asarray(res.mask)].min() >= 0
        k, v = entries(rng, 5)
        exact.add(k, v)
        mem.add(k, v)
        np.testing.assert_array_equal(mem.backend.counts(), exact.backend.counts())
    assert set(np.asarray(mem.search(q, 40).ids)[1].ravel()) >= {0, 2**31 - 1}   # both sides of the wrap
    assert mem.backend.counts().tolist() == [2**33 + 20, 2**31 + 12, 2**31 + 15]
    assert not jax.config.jax_enable_x64


def test_host_and_float64_inputs_and_gradients_stopped():
    exact, mem = pair("cosine")
    rng = np.random.default_rng(4)
    k64 = rng.standard_normal((B, 4, H, DK))
    v = rng.standard_normal((B, 4, H, DV)).astype(np.float32)
    mem.add(k64, jnp.asarray(v, jnp.bfloat16))      # numpy float64 keys, jax bfloat16 values
    exact.add(k64, np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32))

    def loss(k):  # a memory written and searched under jax.grad keeps no tracer and passes no gradient
        mem.add(k, jnp.asarray(v))
        return mem.search(k[:, :TQ], 3).scores.sum() + (k * k).sum()

    k = jnp.asarray(rng.standard_normal((B, 4, H, DK)), jnp.float32)
    np.testing.assert_allclose(jax.grad(loss)(k), 2 * k, rtol=1e-6)
    exact.add(np.asarray(k), v)
    q = queries(rng)
    assert_matches(exact, exact.search(q, 9), mem.search(q, 9))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda k: mem.add(k, jnp.asarray(v)))(k)
    assert mem.size.tolist() == [8] * B


def test_save_load_round_trip_and_exchange_with_exact(tmp_path):
    rng = np.random.default_rng(2)
    exact, mem = pair("cosine", score_dtype="bfloat16", block_bytes=4096)
    mem.set_search_options(rescore_factor=3)
    k, v = entries(rng, C + 7)
    mem.add(k, v)
    exact.add(k, v)
    mem.clear([2])
    exact.clear([2])
    path = tmp_path / "mem.kvm"
    mem.save(path)
    assert saved_header(path)["options"] == {"device": "cpu:0", "score_dtype": "bfloat16", "block_bytes": 4096,
                                             "check_finite": True, "rescore_factor": 3, "method": "exact",
                                             "recall_target": 0.95}
    loaded = kvmemory.Memory.load(path, device="cpu")
    assert loaded.backend_name == "jax" and loaded.options == mem.options
    q = queries(rng)
    for a, b in zip(mem.search(q, 9), loaded.search(q, 9)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # states are interchangeable with the exact backend's, both ways
    other, fp32 = pair("cosine")
    fp32.backend.load_state_dict(exact.backend.state_dict())
    other.backend.load_state_dict(mem.backend.state_dict())
    assert_matches(exact, exact.search(q, 9), fp32.search(q, 9))
    np.testing.assert_array_equal(other.search(q, 9).ids, exact.search(q, 9).ids)


def test_load_state_dict_refuses_mismatch_and_keeps_state():
    _, mem = pair()
    mem.add(*entries(np.random.default_rng(0), 3))
    state = mem.backend.state_dict()
    before = {name: np.array(a) for name, a in state.items()}
    with pytest.raises(ValueError, match="'keys' has shape"):
        mem.backend.load_state_dict(dict(state, keys=np.zeros((B, H, C + 1, DK), np.float32)))
    with pytest.raises(ValueError, match="negative"):
        mem.backend.load_state_dict(dict(state, counts=np.full(B, -1, np.int64)))
    with pytest.raises(ValueError, match="lacks 'values'"):
        mem.backend.load_state_dict({"keys": state["keys"], "counts": state["counts"]})
    for name, arr in mem.backend.state_dict().items():
        np.testing.assert_array_equal(arr, before[name])
    assert mem.size.tolist() == [3] * B


@pytest.mark.parametrize("bad, error, match", [
    (lambda: (jnp.ones((B, 2, H + 1, DK)), jnp.ones((B, 2, H + 1, DV))), ValueError, "heads"),
    (lambda: (jnp.ones((B, 2, H, DK)), jnp.ones((B, 3, H, DV))), ValueError, "tokens"),
    (lambda: (jnp.ones((2, H, DK)), jnp.ones((2, H, DV))), ValueError, "4 dims"),
    (lambda: (jnp.full((B, 2, H, DK), jnp.nan), jnp.ones((B, 2, H, DV))), ValueError, "NaN"),
    (lambda: (jnp.ones((B, 2, H, DK)), jnp.full((B, 2, H, DV), jnp.inf)), ValueError, "NaN or inf"),
    (lambda: (jnp.ones((B, 2, H, DK), jnp.int32), jnp.ones((B, 2, H, DV))), TypeError, "float"),
])
def test_bad_add_is_refused_and_changes_nothing(bad, error, match):
    rng = np.random.default_rng(1)
    _, mem = pair()
    mem.add(*entries(rng, 3))
    q = queries(rng)
    before = mem.search(q, 3)
    with pytest.raises(error, match=match):
        mem.add(*bad())
    assert mem.size.tolist() == [3] * B
    for a, b in zip(before, mem.search(q, 3)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_search_and_options():
    _, mem = pair()
    with pytest.raises(ValueError, match="key_dim"):
        mem.search(jnp.ones((B, 1, H, DK + 1)), 2)
    with pytest.raises(ValueError, match="NaN"):
        mem.search(jnp.full((B, 1, H, DK), jnp.nan), 2)
    with pytest.raises(ValueError, match="valid options"):
        kvmemory.Memory(DK, backend="jax", blok_bytes=1)
    with pytest.raises(ValueError, match="score_dtype"):
        kvmemory.Memory(DK, backend="jax", score_dtype="int8")
    with pytest.raises(ValueError, match="device"):
        kvmemory.Memory(DK, backend="jax", device="no-such-device")
    with pytest.raises(ValueError, match="device"):
        kvmemory.Memory(DK, backend="jax", device="cpu:7")
    with pytest.raises(ValueError, match="block_bytes"):
        kvmemory.Memory(DK, backend="jax", block_bytes=0)
    with pytest.raises(ValueError, match="rescore_factor"):
        mem.set_search_options(rescore_factor=0)
    with pytest.raises(ValueError, match="valid search options"):
        mem.set_search_options(ef=10)
    assert kvmemory.Memory(DK, backend="jax", device=jax.devices("cpu")[0]).options["device"] == "cpu:0"


def test_check_finite_off_skips_the_check():
    mem = kvmemory.Memory(DK, backend="jax", check_finite=False)
    mem.search(jnp.full((1, 1, 1, DK), jnp.nan), 2)  # accepted: the caller vouches for its inputs
    assert JaxBackend.build_options["check_finite"] is True


def test_size_array_survives_later_adds_and_clears():
    """add and clear donate the state's buffers: size_array must not alias them."""
    rng = np.random.default_rng(9)
    _, mem = pair("ip")
    mem.add(*entries(rng, 3))
    size = mem.backend.size_array()
    mem.add(*entries(rng, 2))
    mem.clear([0])
    assert np.asarray(size).tolist() == [3] * B and size.dtype == jnp.int32
    assert mem.size.tolist() == [0] + [5] * (B - 1)
