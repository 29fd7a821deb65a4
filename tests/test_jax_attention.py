"""memory_attention, knn_attention_step and the bridge from jax arrays to host backends."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import kvmemory  # noqa: E402
from kvmemory import SearchResult  # noqa: E402
from kvmemory_jax import bridge, knn_attention_step, memory_attention  # noqa: E402

B, T, H, D, K = 2, 4, 2, 3, 5


def reference(q, k, v, mem_keys, mem_values, mem_mask, gate_bias, scale):
    """The layer in float64 numpy, one (row, token, head) at a time."""
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                qs = q[b, t, h] * scale[h]
                w = np.exp(k[b, :t + 1, h] @ qs - (k[b, :t + 1, h] @ qs).max())
                local = (w / w.sum()) @ v[b, :t + 1, h]
                m = mem_mask[b, t, h]
                gate = 1 / (1 + np.exp(-gate_bias[h])) if m.any() else 0.0
                mem = 0.0
                if m.any():
                    logits = mem_keys[b, t, h, m] @ qs
                    w = np.exp(logits - logits.max())
                    mem = (w / w.sum()) @ mem_values[b, t, h, m]
                out[b, t, h] = gate * mem + (1 - gate) * local
    return out


def layer_inputs(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, H, D)).astype(dtype) for _ in range(3))
    mem_keys = rng.standard_normal((B, T, H, K, D)).astype(dtype)
    mem_values = rng.standard_normal((B, T, H, K, D)).astype(dtype)
    mem_mask = rng.random((B, T, H, K)) > 0.3
    mem_mask[1] = False           # row 1: empty memory, local attention only
    mem_mask[0, 0, 0] = True
    return q, k, v, mem_keys, mem_values, mem_mask, np.array([0.4, -0.7], dtype)


def test_matches_float64_reference_and_gradients_check():
    args = layer_inputs()
    scale = np.array([0.8, 1.7])
    with jax.enable_x64(True):
        jargs = [jnp.asarray(a) for a in args]
        out = memory_attention(*jargs, jnp.asarray(scale))
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, reference(*args, scale), rtol=1e-12, atol=1e-12)
        q, k, v, mk, mv, mm, gate = jargs

        def f(q, k, v, gate, scale):
            return memory_attention(q, k, v, mk, mv, mm, gate, scale)

        check_grads(f, (q, k, v, gate, jnp.asarray(scale)), order=1, modes=("fwd", "rev"))
        # no gradient reaches the retrieved keys and values
        g_keys, g_values = jax.grad(lambda a, b: memory_attention(q, k, v, a, b, mm, gate).sum(), (0, 1))(mk, mv)
        assert not g_keys.any() and not g_values.any()
        g_gate = jax.grad(lambda g: memory_attention(q, k, v, mk, mv, mm, g).sum())(gate)
        assert np.all(np.asarray(g_gate) != 0)  # the memory path is live, not gated away
    assert not jax.config.jax_enable_x64


def test_empty_memory_ignores_the_gate():
    q, k, v, mk, mv, mm, _ = layer_inputs(dtype=np.float32)
    none = np.zeros_like(mm)
    a, b = (memory_attention(q, k, v, mk, mv, none, jnp.full(H, g)) for g in (3.0, -3.0))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(memory_attention(q, k, v, mk, mv, mm, jnp.full(H, 3.0)), a, atol=1e-3)


def memory(backend="jax", capacity=8):
    return kvmemory.Memory(D, D, capacity, H, B, backend=backend)


def segments(n, seed=1):
    rng = np.random.default_rng(seed)
    return [tuple(jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3)) for _ in range(n)]


def test_step_gradients_reach_inputs_never_the_memory():
    mem = memory()
    (q0, k0, v0), (q, k, v) = segments(2)
    gate = jnp.array([0.5, -0.5])
    knn_attention_step(mem, q0, k0, v0, gate, k_neighbours=3)
    res = mem.search(q, 3)
    before = mem.backend.state_dict()

    def loss(q, k, v, gate):
        return (knn_attention_step(mem, q, k, v, gate, k_neighbours=3) ** 2).sum()

    grads = jax.grad(loss, (0, 1, 2, 3))(q, k, v, gate)
    want = jax.grad(lambda *a: (memory_attention(*a[:3], res.keys, res.values, res.mask, a[3]) ** 2).sum(),
                    (0, 1, 2, 3))(q, k, v, gate)
    for g, w in zip(grads, want):
        assert np.abs(np.asarray(g)).sum() > 0
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # written once, as plain arrays: the segment's k and v after the earlier ones
    after = mem.backend.state_dict()
    assert mem.size.tolist() == [2 * T] * B and after["counts"].tolist() == [2 * T] * B
    np.testing.assert_array_equal(after["keys"][:, :, :T], before["keys"][:, :, :T])
    np.testing.assert_array_equal(after["keys"][:, :, T:], np.asarray(k).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(after["values"][:, :, T:], np.asarray(v).transpose(0, 2, 1, 3))


def test_step_under_jit_is_refused_before_anything_changes():
    mem = memory()
    q, k, v = segments(1)[0]
    knn_attention_step(mem, q, k, v, jnp.zeros(H), k_neighbours=3)
    step = jax.jit(lambda q: knn_attention_step(mem, q, k, v, jnp.zeros(H), doc_start=jnp.ones(B, bool)))
    with pytest.raises(TypeError, match="q is traced"):
        step(q)
    assert mem.size.tolist() == [T] * B


def test_doc_start_clears_exactly_the_flagged_rows():
    mem, fresh = memory(), memory()
    (q0, k0, v0), (q, k, v) = segments(2)
    gate = jnp.zeros(H)
    knn_attention_step(mem, q0, k0, v0, gate, k_neighbours=3)
    out = knn_attention_step(mem, q, k, v, gate, doc_start=jnp.array([True, False]), k_neighbours=3)
    assert mem.size.tolist() == [T, 2 * T]
    ref = knn_attention_step(fresh, q, k, v, gate, k_neighbours=3)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-6)        # row 0 saw no memory
    assert not np.allclose(out[1], ref[1], atol=1e-3)             # row 1 kept its past
    with pytest.raises(ValueError, match="doc_start must be a bool array"):
        knn_attention_step(mem, q, k, v, gate, doc_start=jnp.array([1, 0]))
    assert mem.size.tolist() == [T, 2 * T]


def test_host_backend_through_bridge_matches_jax_backend():
    a, b = memory("jax", capacity=6), memory("exact", capacity=6)   # 4 segments of T wrap the FIFO
    gate = jnp.array([0.3, -0.2])
    for i, (q, k, v) in enumerate(segments(4)):
        start = jnp.array([i == 2, False])
        out_a = knn_attention_step(a, q, k, v, gate, doc_start=start, k_neighbours=3)
        out_b = knn_attention_step(b, q, k, v, gate, doc_start=start, k_neighbours=3)
        assert isinstance(out_b, jax.Array)
        np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.size, b.size)
    q = segments(1, seed=3)[0][0]
    ra, rb = bridge.search(a, q, 7), bridge.search(b, q, 7)
    assert all(isinstance(x, jax.Array) for x in rb)
    for x, y in zip(ra, rb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    bare = bridge.search(b, q, 7, with_entries=False)
    assert bare.keys is None and np.array_equal(np.asarray(bare.ids), np.asarray(rb.ids))


def test_result_to_device_keeps_values_and_ids_become_int32_modulo_the_horizon():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**40, (B, 1, H, 3))
    ids[0, 0, 0, 2] = -1
    res = SearchResult(keys=rng.standard_normal((B, 1, H, 3, D)).astype(np.float32),
                       values=rng.standard_normal((B, 1, H, 3, 2)).astype(np.float32),
                       scores=rng.standard_normal((B, 1, H, 3)).astype(np.float32), ids=ids, mask=ids >= 0)
    moved = bridge.result_to_device(res)
    for name in ("keys", "values", "scores", "mask"):
        got = np.asarray(getattr(moved, name))
        assert isinstance(getattr(moved, name), jax.Array) and got.dtype == getattr(res, name).dtype
        np.testing.assert_array_equal(got, getattr(res, name))
    assert moved.ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(moved.ids), np.where(ids >= 0, ids % 2**31, -1))
