"""The functional API of kvmemory_jax (init / add / search / clear) against the reference model and the exact backend."""

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import kvmemory  # noqa: E402
import kvmemory_jax as kvj  # noqa: E402
from checks import assert_matches_exact, check_result  # noqa: E402
from kvmemory_jax import topk  # noqa: E402
from kvmemory_jax.state import ID_HORIZON  # noqa: E402
from reference import ReferenceMemory  # noqa: E402

B, H, C, DK, DV, TQ = 2, 2, 5, 4, 3, 2       # fixed shapes: one compile per (metric, tokens, k)
ADD_TOKENS, KS = (1, 3, 7), (1, 4, 9)


def arrays(rng, T, dim, integers=False):
    if integers:  # small integers: ties and zero vectors
        return rng.integers(-2, 3, (B, T, H, dim)).astype(np.float32)
    return rng.standard_normal((B, T, H, dim)).astype(np.float32)


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from(ADD_TOKENS), st.booleans()),
    st.tuples(st.just("search"), st.sampled_from(KS), st.booleans()),
    st.tuples(st.just("clear"), st.lists(st.booleans(), min_size=B, max_size=B), st.just(False)),
), min_size=1, max_size=14)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(metric=st.sampled_from(kvmemory.METRICS), steps=ops, seed=st.integers(0, 2**16))
def test_random_operation_sequences_match_the_reference(metric, steps, seed):
    """Every op jitted, state threaded by hand: results and sizes as the reference model says."""
    rng = np.random.default_rng(seed)
    state, ref = kvj.init(B, H, C, DK, DV, metric=metric), ReferenceMemory(B, C, metric)
    for op, arg, integers in steps:
        if op == "add":
            keys, values = arrays(rng, arg, DK, integers), arrays(rng, arg, DV)
            state = jit_add(state, keys, values)
            ref.add(keys, values)
        elif op == "clear":
            state = jit_clear(state, np.array(arg))
            ref.clear(np.flatnonzero(arg))
        else:
            queries = arrays(rng, TQ, DK, integers)
            check_result(jit_search(state, queries, k=arg), ref, queries, arg, exact=True, id_dtype=np.int32)
        np.testing.assert_array_equal(np.asarray(kvj.size(state)), ref.size())


jit_add, jit_clear = jax.jit(kvj.add), jax.jit(kvj.clear)
jit_search = jax.jit(kvj.search, static_argnames=("k", "method", "recall_target", "block_bytes"))


def test_scan_over_segments_equals_the_step_by_step_loop():
    """clear -> search -> add per segment, as one lax.scan inside jit and as eager calls."""
    rng = np.random.default_rng(0)
    S = 6
    keys, values, queries = arrays(rng, 3 * S, DK).reshape(B, S, 3, H, DK), arrays(rng, 3 * S, DV), None
    keys = np.moveaxis(keys, 1, 0)
    values = np.moveaxis(values.reshape(B, S, 3, H, DV), 1, 0)
    queries = np.moveaxis(arrays(rng, TQ * S, DK).reshape(B, S, TQ, H, DK), 1, 0)
    starts = rng.random((S, B)) < 0.3

    def step(state, seg):
        k, v, q, start = seg
        state = kvj.clear(state, start)
        res = kvj.search(state, q, 4, block_bytes=B * H * TQ * 4 * 2)     # tiled: 2 columns... at least m
        return kvj.add(state, k, v), res

    state0 = kvj.init(B, H, C, DK, DV, metric="l2")
    scanned_state, scanned = jax.jit(lambda s, xs: jax.lax.scan(step, s, xs))(state0, (keys, values, queries, starts))
    state = state0
    for i in range(S):
        state, res = step(state, (keys[i], values[i], queries[i], starts[i]))
        for got, want in zip(jax.tree.map(lambda x: x[i], scanned), res):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(scanned_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not jax.config.jax_enable_x64


def near_horizon(counts, metric="ip"):
    """A functional state and an exact Memory holding the same entries, rows at int64 ``counts``."""
    rng = np.random.default_rng(1)
    exact = kvmemory.Memory(DK, DV, C, H, B, metric=metric)
    exact.add(arrays(rng, C, DK), arrays(rng, C, DV))
    saved = dict(exact.backend.state_dict(), counts=np.array(counts, np.int64))
    exact.backend.load_state_dict(saved)
    counters = kvj.state.counters_from_counts(saved["counts"], C)
    state = kvj.init(B, H, C, DK, DV, metric=metric).replace(
        keys=jnp.asarray(saved["keys"]), values=jnp.asarray(saved["values"]),
        **{name: jnp.asarray(a) for name, a in counters.items()})
    return state, exact


def test_ids_wrap_modulo_the_horizon_without_x64():
    """Row 0 crosses 2**31 during the adds, row 1 sits past 2**33: ids are the exact ids modulo 2**31."""
    state, exact = near_horizon([ID_HORIZON - 4, 2**33 + 2])
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(3):
        q = arrays(rng, TQ, DK)
        res = jit_search(state, q, k=C + 2)
        assert res.ids.dtype == jnp.int32
        assert_matches_exact(exact, exact.search(q, C + 2), tuple(np.asarray(x) for x in res), id_dtype=np.int32)
        seen |= set(np.asarray(res.ids)[0][np.asarray(res.mask)[0]].tolist())
        k, v = arrays(rng, 3, DK), arrays(rng, 3, DV)
        state = jit_add(state, k, v)
        exact.add(k, v)
        np.testing.assert_array_equal(kvj.state.host_counts(state), exact.backend.counts())
    assert {ID_HORIZON - 1, 0} <= seen                                   # both sides of the wrap
    assert kvj.state.host_counts(state).tolist() == [ID_HORIZON + 5, 2**33 + 11]
    assert np.asarray(state.wraps).tolist() == [1, 4] and not jax.config.jax_enable_x64


def test_gradients_reach_queries_and_gate_never_the_memory():
    rng = np.random.default_rng(3)
    state = kvj.add(kvj.init(B, H, C, DK, DK), arrays(rng, 4, DK), arrays(rng, 4, DK))
    q, k, v = (jnp.asarray(arrays(rng, 3, DK)) for _ in range(3))
    gate = jnp.array([0.3, -0.4])

    def loss(q, k, v, gate, state):
        return (kvj.knn_attention(state, q, k, v, gate, k_neighbours=3)[0] ** 2).sum()

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), allow_int=True))(q, k, v, gate, state)
    for g in grads[:4]:
        assert np.abs(np.asarray(g)).sum() > 0
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(grads[4]) if x.dtype == jnp.float32)  # read
    written = jax.grad(lambda k, v: sum(jnp.sum(x) for x in jax.tree.leaves(kvj.knn_attention(
        state, q, k, v, gate, k_neighbours=3)[1]) if x.dtype == jnp.float32), (0, 1))(k, v)
    assert not any(np.asarray(g).any() for g in written)                                               # written
    # the memory path reaches q: its gradient differs from the one with the memory gated off
    g_off = jax.grad(lambda q: (kvj.knn_attention(state, q, k, v, jnp.full(H, -30.0), k_neighbours=3)[0] ** 2).sum())(q)
    g_on = jax.grad(lambda q: (kvj.knn_attention(state, q, k, v, jnp.full(H, 30.0), k_neighbours=3)[0] ** 2).sum())(q)
    assert not np.allclose(g_on, g_off, atol=1e-3)
    # search itself is a constant: nothing flows back through its scores
    assert not jax.grad(lambda q: kvj.search(state, q, 3).scores.sum())(q).any()


@pytest.mark.parametrize("method", ["approx_max_k", "bins"])
def test_approximate_methods_return_only_live_entries_with_exact_scores(method):
    """Recall may drop, nothing else: every returned id is live, its score exact, masks and order as specified."""
    rng = np.random.default_rng(4)
    cap, k = 64, 8
    state, ref = kvj.init(B, H, cap, DK, DV, metric="cosine"), ReferenceMemory(B, cap, "cosine")
    recalls = []
    for T in (20, 70, 9):  # partly filled, wrapped, then row 1 cleared and refilled a little
        keys, values = arrays(rng, T, DK), arrays(rng, T, DV)
        state, _ = kvj.add(state, keys, values), ref.add(keys, values)
        if T == 70:
            state, _ = kvj.clear(state, np.array([False, True])), ref.clear([1])
        q = arrays(rng, TQ, DK)
        res = kvj.search(state, q, k, method=method, recall_target=0.6)
        check_result(res, ref, q, k, exact=False, id_dtype=np.int32)
        exact = kvj.search(state, q, k)
        recalls.append(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b[b >= 0]) if (b >= 0).any() else 1
                                for a, b in zip(np.asarray(res.ids).reshape(-1, k), np.asarray(exact.ids).reshape(-1, k))]))
    if method == "approx_max_k" and jax.default_backend() != "tpu":
        assert recalls == [1.0] * 3           # XLA's fallback off TPU is the exact top-k
    assert np.mean(recalls) >= 0.5


def test_bins_recall_follows_the_target():
    """On random scores the binned top-k's recall@k is near the target it was sized for, and exact at 1."""
    x = jax.random.normal(jax.random.key(0), (256, 4096))
    exact = np.asarray(jax.lax.top_k(x, 32)[1])
    for target in (0.8, 0.95):
        assert topk.num_bins(4096, 32, target) < 4096
        got = np.asarray(topk.binned_top_k(x, 32, target)[1])
        recall = np.mean([len(set(a) & set(b)) / 32 for a, b in zip(got, exact)])
        assert target - 0.05 <= recall <= 1.0, (target, recall)
    assert topk.num_bins(4096, 32, 1.0) == 4096 and topk.num_bins(4096, 1, 0.5) == 1
    np.testing.assert_array_equal(np.asarray(topk.binned_top_k(x, 32, 1.0)[1]), exact)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 4000), m=st.integers(1, 12), seed=st.integers(0, 2**31 - 1),
       ties=st.booleans(), masked=st.floats(0, 0.95))
def test_grouped_top_k_equals_lax_top_k(n, m, seed, ties, masked):
    """The exact two-stage selection returns lax.top_k's values, and indices that hold them (ties, -inf, any n)."""
    m = min(m, n)
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, (3, n)).astype(np.float32) if ties else rng.standard_normal((3, n)).astype(np.float32)
    x[rng.random((3, n)) < masked] = -np.inf
    values, idx = topk.grouped_top_k(jnp.asarray(x), m)
    want, _ = jax.lax.top_k(jnp.asarray(x), m)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want))
    idx = np.asarray(idx)
    np.testing.assert_array_equal(np.take_along_axis(x, idx, -1), np.asarray(want))
    assert all(len(set(row)) == m for row in idx)                    # m distinct columns
    assert idx.min() >= 0 and idx.max() < n


def test_grouped_top_k_splits_long_rows_only():
    assert topk.exact_groups(65536, 32) == 1024                          # ~sqrt(n m), a power of two
    assert topk.exact_groups(4095, 32) == 0                              # n < 128 m: one lax.top_k
    assert topk.exact_groups(4096, 32) == 256
    assert all(m <= topk.exact_groups(n, m) < n for m in range(1, 300, 7) for n in range(128 * m, 128 * m + 3000, 97))


@pytest.mark.parametrize("metric,dtype", [("ip", "float32"), ("cosine", "float32"), ("l2", "float32"),
                                          ("ip", "bfloat16")])
def test_exact_search_through_grouped_selection_matches_exact_backend(metric, dtype):
    """Rows long enough for the two-stage top-k, whole and in tiles, FIFO-wrapped, partly filled and cleared."""
    rng = np.random.default_rng(11)
    cap, T = 2000, 3
    exact = kvmemory.Memory(DK, DV, cap, H, B, metric=metric)
    state = kvj.init(B, H, cap, DK, DV, metric=metric, score_dtype=dtype)
    for n in (1500, 900, 700):                                          # row 0 wraps; row 1 cleared, refilled
        k, v = arrays(rng, n, DK), arrays(rng, n, DV)
        exact.add(k, v)
        state = jit_add(state, k, v)
        if n == 900:
            exact.clear([1])
            state = jit_clear(state, jnp.array([False, True]))
    q = arrays(rng, T, DK)
    for kq in (1, 8):
        assert topk.exact_groups(cap, kq) and topk.exact_groups(1100, kq)        # the grouped path runs
        for block in (1 << 24, B * H * T * 4 * 1100):                             # whole rows; tiles of 1,100
            res = kvj.search(state, q, kq, block_bytes=block)
            assert_matches_exact(exact, exact.search(q, kq), tuple(np.asarray(x) for x in res), id_dtype=np.int32,
                                 tol=2e-2 if dtype == "bfloat16" else 1e-5)


@pytest.mark.parametrize("method", ["exact", "approx_max_k"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_stored_nan_key_is_never_returned(sign, method):
    """Unchecked adds may store NaN; its score is NaN for every query, and search treats it as no entry:
    a +NaN takes no neighbour's place, a -NaN hides no other member of its group from the two-stage top-k."""
    cap, k = 4096, 4
    keys = np.zeros((1, cap, 1, 8), np.float32)
    keys[0, :, 0, 0] = np.arange(cap) / 100                            # score of id i: i / 100
    best_group = (cap - 1) % topk.exact_groups(cap, k)
    keys[0, best_group, 0, 1] = np.copysign(np.float32(np.nan), sign)  # in the group of the best id
    state = jit_add(kvj.init(1, 1, cap, 8, 8), jnp.asarray(keys), jnp.asarray(keys))
    q = np.zeros((1, 3, 1, 8), np.float32)
    q[..., 0] = 1
    res = kvj.search(state, q, k, method=method)
    np.testing.assert_array_equal(np.asarray(res.ids)[0, :, 0], [[cap - 1, cap - 2, cap - 3, cap - 4]] * 3)
    np.testing.assert_allclose(np.asarray(res.scores)[0, :, 0], [[40.95, 40.94, 40.93, 40.92]] * 3, rtol=1e-6)


def test_bfloat16_scan_and_tiles_match_exact_backend():
    rng = np.random.default_rng(5)
    exact = kvmemory.Memory(DK, DV, C, H, B, metric="ip")
    state = kvj.init(B, H, C, DK, DV, score_dtype="bfloat16")
    for T in (3, 4):
        k, v = arrays(rng, T, DK), arrays(rng, T, DV)
        exact.add(k, v)
        state = jit_add(state, k, v)
    q = arrays(rng, TQ, DK)
    for block in (1 << 20, 4 * B * H * TQ):
        res = kvj.search(state, q, 3, block_bytes=block)
        assert_matches_exact(exact, exact.search(q, 3), tuple(np.asarray(x) for x in res), id_dtype=np.int32)


def bad(fn, error, *match):
    with pytest.raises(error) as e:
        fn()
    for m in match:
        assert m in str(e.value), (m, str(e.value))


def test_bad_input_is_refused_when_traced():
    """Shapes, dtypes and static arguments are checked at trace time, naming the argument, expected and actual."""
    state = kvj.init(B, H, C, DK, DV)
    k, v = jnp.ones((B, 3, H, DK)), jnp.ones((B, 3, H, DV))
    bad(lambda: jit_add(state, jnp.ones((B, 3, H + 1, DK)), jnp.ones((B, 3, H + 1, DV))), ValueError,
        "keys axis 2 (heads) must be 2, got 3")
    bad(lambda: jit_add(state, k, jnp.ones((B, 2, H, DV))), ValueError, "values axis 1 (tokens) must be 3, got 2")
    bad(lambda: jit_add(state, k, jnp.ones((B, 3, H, DK))), ValueError, "values axis 3 (value_dim) must be 3, got 4")
    bad(lambda: jit_add(state, k.astype(jnp.int32), v), TypeError, "keys must have a float dtype", "got int32")
    bad(lambda: jit_add(state, k[0], v[0]), ValueError, "keys must have 4 dims", "got shape (3, 2, 4)")
    bad(lambda: jit_search(state, jnp.ones((B, 1, H, DK + 1)), k=2), ValueError, "queries axis 3 (key_dim) must be 4")
    bad(lambda: jit_search(state, jnp.ones((B + 1, 1, H, DK)), k=2), ValueError, "queries axis 0 (batch) must be 2")
    bad(lambda: jax.jit(kvj.search)(state, jnp.ones((B, 1, H, DK)), 2), TypeError, "k must be a static Python int")
    bad(lambda: jit_search(state, jnp.ones((B, 1, H, DK)), k=0), ValueError, "k must be >= 1, got 0")
    bad(lambda: jit_search(state, jnp.ones((B, 1, H, DK)), k=2, method="lsh"), ValueError, "method must be one of")
    bad(lambda: jit_search(state, jnp.ones((B, 1, H, DK)), k=2, recall_target=0.0), ValueError, "recall_target")
    bad(lambda: jit_clear(state, jnp.ones(B, jnp.int32)), ValueError, "mask must be a bool array [batch=2]", "int32")
    bad(lambda: jit_clear(state, jnp.ones(B + 1, bool)), ValueError, "mask must be a bool array [batch=2]", "(3,)")
    bad(lambda: kvj.init(B, H, 0, DK), ValueError, "capacity must be >= 1, got 0")
    bad(lambda: kvj.init(B, H, 2**30 + 1, DK), ValueError, "capacity must be <= 1073741824")
    bad(lambda: kvj.init(B, H, C, DK, metric="dot"), ValueError, "metric must be one of")
    bad(lambda: kvj.init(B, H, C, DK, score_dtype="int8"), ValueError, "score_dtype must be one of")


def test_finite_checks_are_opt_in_through_checkify():
    """check_finite=True names the first non-finite argument under kvmemory_jax.checked; off, nothing syncs."""
    state = kvj.init(B, H, C, DK, DV)
    good_k, good_v = jnp.ones((B, 1, H, DK)), jnp.ones((B, 1, H, DV))
    add = kvj.checked(functools.partial(kvj.add, check_finite=True))
    bad(lambda: add(state, good_k.at[0, 0, 0, 0].set(jnp.nan), good_v), Exception, "keys contains NaN or inf")
    bad(lambda: add(state, good_k, good_v.at[1].set(jnp.inf)), Exception, "values contains NaN or inf")
    search = kvj.checked(lambda s, q: kvj.search(s, q, 2, check_finite=True))
    bad(lambda: search(state, jnp.full((B, 1, H, DK), jnp.nan)), Exception, "queries contains NaN or inf")
    assert np.asarray(kvj.size(add(state, good_k, good_v))).tolist() == [1, 1]
    assert np.asarray(kvj.size(state)).tolist() == [0, 0]                  # the caller's state is untouched
    bad(lambda: jax.jit(functools.partial(kvj.add, check_finite=True))(state, good_k, good_v), ValueError,
        "checkify")                                                       # checks need checkify under jit


def test_flax_modules_without_flax_name_the_extra(monkeypatch):
    """kvmemory_jax imports no flax; its Flax modules, asked for without it, say which extra to install."""
    import sys
    monkeypatch.setitem(sys.modules, "flax", None)
    with pytest.raises(ImportError, match=r"pip install 'kvmemory\[flax\]'"):
        kvj.KNNAttention
    with pytest.raises(AttributeError, match="no attribute 'KNNAttn'"):
        kvj.KNNAttn
