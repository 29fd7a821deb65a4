"""backend="torch" against backend="exact", its ring semantics, persistence and input checks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvmemory  # noqa: E402
from checks import assert_matches_exact, replay_against_exact, saved_header  # noqa: E402
from kvmemory_torch import TorchBackend  # noqa: E402

B, H, C, DK, DV = 3, 2, 32, 16, 5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def pair(metric="ip", capacity=C, **options):
    """An exact memory and a torch memory of the same shape."""
    shape = dict(key_dim=DK, value_dim=DV, capacity=capacity, num_heads=H, batch_size=B, metric=metric)
    return (kvmemory.Memory(**shape, backend="exact"),
            kvmemory.Memory(**shape, backend="torch", device="cpu", **options))


def entries(rng, T):
    return (rng.standard_normal((B, T, H, DK)).astype(np.float32),
            rng.standard_normal((B, T, H, DV)).astype(np.float32))


def assert_matches(exact: kvmemory.Memory, res_exact, res_torch, tol=1e-5):
    """Same top-k as the exact backend: masks, scores, ids (ties aside), and each id's stored entry."""
    for name in ("keys", "values", "scores", "ids", "mask"):
        assert isinstance(getattr(res_torch, name), torch.Tensor), name
    assert res_torch.scores.dtype == torch.float32 and res_torch.ids.dtype == torch.int64
    assert res_torch.mask.dtype == torch.bool
    assert_matches_exact(exact, res_exact, tuple(t.numpy() for t in res_torch), tol)


@pytest.mark.parametrize("score_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_matches_exact_through_fifo_clears_and_large_k(metric, score_dtype):
    rng = np.random.default_rng(7)
    exact, mem = pair(metric, score_dtype=score_dtype, block_bytes=B * H * 4 * 2 * 9)  # tiles of ~9 columns
    steps = [("add", 5), ("search", 3), ("search", 9), ("add", 20), ("search", 4), ("add", 11),
             ("search", 4), ("search", 40), ("clear", [1]), ("search", 4), ("add", 70), ("search", 6),
             ("clear", [0, 2]), ("add", 3), ("search", 8), ("add", C), ("search", 4)]
    replay_against_exact(exact, mem, steps, lambda T: entries(rng, T),
                         lambda: rng.standard_normal((B, 4, H, DK)).astype(np.float32), torch.from_numpy,
                         lambda res_exact, res: assert_matches(exact, res_exact, res))


def test_low_precision_without_rescore_would_differ():
    """bf16 scan scores are not the float32 scores returned: the rescore is what makes them exact."""
    rng = np.random.default_rng(3)
    exact, mem = pair("ip", score_dtype="bfloat16")
    k, v = entries(rng, C)
    exact.add(k, v)
    mem.add(k, v)
    q = rng.standard_normal((B, 2, H, DK)).astype(np.float32)
    res = mem.search(q, 4)
    bf16 = torch.einsum("bthd,bthkd->bthk", torch.from_numpy(q).bfloat16(), res.keys.bfloat16()).float()
    assert not torch.allclose(bf16, res.scores, atol=1e-5)
    assert_matches(exact, exact.search(q, 4), res)


def test_ids_follow_the_stream_and_evicted_entries_never_return():
    mem = kvmemory.Memory(key_dim=2, capacity=4, batch_size=2, backend="torch", device="cpu")
    # entry i has key (1, i): with ip and query (0, 1) the newest entries score highest
    for start in range(0, 10, 3):
        ids = torch.arange(start, start + 3, dtype=torch.float32)
        keys = torch.stack([torch.ones(3), ids], -1)[None, :, None].repeat(2, 1, 1, 1)
        mem.add(keys, keys)
    res = mem.search(torch.tensor([0.0, 1.0]).repeat(2, 1, 1, 1), k=6)
    assert res.ids[0, 0, 0].tolist() == [11, 10, 9, 8, -1, -1]
    assert res.scores[0, 0, 0].tolist() == [11, 10, 9, 8, 0, 0]
    assert res.values[0, 0, 0, :4, 1].tolist() == [11, 10, 9, 8]
    assert res.mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2
    assert mem.size.tolist() == [4, 4] and mem.backend.counts().tolist() == [12, 12]


def test_clear_restarts_ids_and_spares_other_rows():
    mem = kvmemory.Memory(key_dim=2, capacity=4, batch_size=2, backend="torch", device="cpu")
    mem.add(torch.ones(2, 6, 1, 2), torch.ones(2, 6, 1, 2))
    mem.clear(0)
    assert mem.size.tolist() == [0, 4]
    res = mem.search(torch.ones(2, 1, 1, 2), k=2)
    assert not res.mask[0].any() and res.mask[1].all()
    mem.add(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2))
    res = mem.search(torch.ones(2, 1, 1, 2), k=5)
    assert res.ids[0, 0, 0].tolist() == [0, -1, -1, -1, -1]
    assert sorted(res.ids[1, 0, 0, :4].tolist()) == [3, 4, 5, 6]


def test_clear_mask_tensor_matches_clear():
    rng = np.random.default_rng(1)
    exact, mem = pair()
    k, v = entries(rng, 10)
    exact.add(k, v)
    mem.add(k, v)
    exact.clear([1])
    mem.backend.clear_mask_tensor(torch.tensor([False, True, False]))
    q = rng.standard_normal((B, 2, H, DK)).astype(np.float32)
    assert_matches(exact, exact.search(q, 5), mem.search(q, 5))
    np.testing.assert_array_equal(mem.size, exact.size)
    with pytest.raises(ValueError, match="bool tensor"):
        mem.backend.clear_mask_tensor(torch.tensor([0, 1, 0]))


def test_search_after_a_device_clear_of_every_row_pads_missing_neighbours():
    """After clear_mask_tensor (no host sync) the memory's bound on row sizes is stale: k > what rows hold."""
    rng = np.random.default_rng(3)
    exact, mem = pair()
    k, v = entries(rng, 10)
    exact.add(k, v)
    mem.add(k, v)
    exact.clear([0, 1, 2])
    mem.backend.clear_mask_tensor(torch.ones(B, dtype=torch.bool))
    k, v = entries(rng, 2)
    exact.add(k, v)
    mem.add(k, v)
    q = rng.standard_normal((B, 3, H, DK)).astype(np.float32)
    got = mem.search(q, 8)
    assert got.mask.sum(-1).max() == 2
    assert_matches(exact, exact.search(q, 8), got)


def test_memory_clear_keeps_a_device_mask_on_the_device(monkeypatch):
    """Memory.clear(bool tensor) reaches clear_mask_tensor without a numpy round trip."""
    rng = np.random.default_rng(2)
    exact, mem = pair()
    k, v = entries(rng, 6)
    exact.add(k, v)
    mem.add(k, v)
    import kvmemory.backends.base
    exact.clear([0, 2])
    monkeypatch.setattr(kvmemory.backends.base, "rows_to_mask", lambda *a: pytest.fail("host mask built"))
    mem.clear(torch.tensor([True, False, True]))
    np.testing.assert_array_equal(mem.size, exact.size)
    with pytest.raises(ValueError, match=r"bool mask must have shape \(3,\), got \(2,\)"):
        mem.clear(torch.tensor([True, False]))
    np.testing.assert_array_equal(mem.size, exact.size)


def test_empty_memory_and_empty_query():
    _, mem = pair()
    res = mem.search(torch.randn(B, 2, H, DK), k=3)
    assert res.keys.shape == (B, 2, H, 3, DK) and res.values.shape == (B, 2, H, 3, DV)
    assert not res.mask.any() and (res.ids == -1).all() and not res.scores.any()
    mem.add(torch.randn(B, 2, H, DK), torch.randn(B, 2, H, DV))
    assert mem.search(torch.randn(B, 0, H, DK), k=3).ids.shape == (B, 0, H, 3)


def test_accepts_numpy_bf16_and_float64_and_never_tracks_gradients():
    exact, mem = pair()
    k = torch.randn(B, 4, H, DK, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, 4, H, DV).bfloat16()
    k2, v2 = np.random.default_rng(4).standard_normal((2, B, 4, H, DK))
    mem.add(k, v)
    mem.add(k2, v2[..., :DV])  # numpy float64
    exact.add(k.detach().numpy(), v.float().numpy())
    exact.add(k2, v2[..., :DV])
    assert not mem.backend.keys.requires_grad and mem.backend.keys.grad_fn is None
    q = torch.randn(B, 2, H, DK, requires_grad=True)
    res = mem.search(q, 3)
    assert not any(t.requires_grad for t in res)
    assert_matches(exact, exact.search(q.detach().numpy(), 3), res)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    _, mem = pair("cosine", score_dtype=torch.bfloat16, block_bytes=4096)
    mem.set_search_options(rescore_factor=3)
    k, v = entries(rng, C + 7)
    mem.add(k, v)
    mem.clear([2])
    path = tmp_path / "mem.kvm"
    mem.save(path)
    assert saved_header(path)["options"] == {"device": "cpu", "score_dtype": "bfloat16", "block_bytes": 4096,
                                 "check_finite": True, "rescore_factor": 3}
    loaded = kvmemory.Memory.load(path, device="cpu")
    assert loaded.backend_name == "torch" and loaded.options == mem.options
    np.testing.assert_array_equal(loaded.size, mem.size)
    q = torch.from_numpy(rng.standard_normal((B, 3, H, DK)).astype(np.float32))
    for a, b in zip(mem.search(q, 5), loaded.search(q, 5)):
        assert torch.equal(a, b)
    fp32 = kvmemory.Memory.load(path, score_dtype="float32")
    assert fp32.backend.scan_keys.dtype == torch.float32 and torch.equal(fp32.search(q, 5).ids, mem.search(q, 5).ids)


def test_load_state_dict_refuses_mismatch_and_keeps_state():
    _, mem = pair()
    mem.add(torch.randn(B, 3, H, DK), torch.randn(B, 3, H, DV))
    state = mem.backend.state_dict()
    before = mem.backend.keys.clone()
    bad_shape = dict(state, keys=np.zeros((B, H, C + 1, DK), np.float32))
    with pytest.raises(ValueError, match="'keys' has shape"):
        mem.backend.load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="negative"):
        mem.backend.load_state_dict(dict(state, counts=np.full(B, -1, np.int64)))
    with pytest.raises(ValueError, match="lacks 'values'"):
        mem.backend.load_state_dict({"keys": state["keys"], "counts": state["counts"]})
    assert torch.equal(mem.backend.keys, before) and mem.size.tolist() == [3] * B


@pytest.mark.parametrize("bad, error, match", [
    (lambda: (torch.randn(B, 2, H + 1, DK), torch.randn(B, 2, H + 1, DV)), ValueError, "heads"),
    (lambda: (torch.randn(B, 2, H, DK), torch.randn(B, 3, H, DV)), ValueError, "tokens"),
    (lambda: (torch.randn(2, H, DK), torch.randn(2, H, DV)), ValueError, "4 dims"),
    (lambda: (torch.full((B, 2, H, DK), float("nan")), torch.randn(B, 2, H, DV)), ValueError, "NaN"),
    (lambda: (torch.randn(B, 2, H, DK), torch.full((B, 2, H, DV), float("inf"))), ValueError, "NaN or inf"),
    (lambda: (torch.randn(B, 2, H, DK, device="meta"), torch.randn(B, 2, H, DV)), ValueError, "meta"),
    (lambda: (torch.ones(B, 2, H, DK, dtype=torch.int64), torch.randn(B, 2, H, DV)), TypeError, "float"),
])
def test_bad_add_is_refused_and_changes_nothing(bad, error, match):
    _, mem = pair()
    mem.add(torch.randn(B, 3, H, DK), torch.randn(B, 3, H, DV))
    q = torch.randn(B, 2, H, DK)
    before = mem.search(q, 4)
    with pytest.raises(error, match=match):
        mem.add(*bad())
    assert mem.size.tolist() == [3] * B
    for a, b in zip(before, mem.search(q, 4)):
        assert torch.equal(a, b)


def test_bad_search_and_options():
    _, mem = pair()
    with pytest.raises(ValueError, match="key_dim"):
        mem.search(torch.randn(B, 1, H, DK + 1), 2)
    with pytest.raises(ValueError, match="NaN"):
        mem.search(torch.full((B, 1, H, DK), float("nan")), 2)
    with pytest.raises(ValueError, match="memory lives on cpu"):
        mem.search(torch.randn(B, 1, H, DK, device="meta"), 2)
    with pytest.raises(ValueError, match="valid options"):
        kvmemory.Memory(DK, backend="torch", device="cpu", blok_bytes=1)
    with pytest.raises(ValueError, match="score_dtype"):
        kvmemory.Memory(DK, backend="torch", device="cpu", score_dtype="int8")
    with pytest.raises(ValueError, match="device"):
        kvmemory.Memory(DK, backend="torch", device="no-such-device")
    with pytest.raises(ValueError, match="block_bytes"):
        kvmemory.Memory(DK, backend="torch", device="cpu", block_bytes=0)
    with pytest.raises(ValueError, match="rescore_factor"):
        mem.set_search_options(rescore_factor=0)
    with pytest.raises(ValueError, match="valid search options"):
        mem.set_search_options(ef=10)


def test_check_finite_off_skips_the_check():
    mem = kvmemory.Memory(DK, backend="torch", device="cpu", check_finite=False)
    mem.search(torch.full((1, 1, 1, DK), float("nan")), 2)  # accepted: the caller vouches for its inputs
    assert TorchBackend.build_options["check_finite"] is True


def test_cpu_results_stay_valid_and_their_buffer_is_reused_once_dropped(rng):
    """On the CPU keys and values are gathered into one lent buffer: a held result is never overwritten."""
    import weakref
    _, mem = pair()
    mem.add(*entries(rng, C))
    q1, q2 = (torch.from_numpy(rng.standard_normal((B, 4, H, DK)).astype(np.float32)) for _ in range(2))
    first = mem.search(q1, 5)
    held, want = first.values[1:, :, 0], first.values[1:, :, 0].clone()
    first_keys = first.keys.clone()
    del first
    second = mem.search(q2, 5)
    assert not np.shares_memory(second.values.numpy(), held.numpy()) and torch.equal(held, want)
    del held, second
    free = mem.backend._results._free
    assert len(free) == 1
    spare = weakref.ref(free[0])
    third = mem.search(q1, 5)
    assert spare() is not None and np.shares_memory(third.keys.numpy(), spare())
    assert np.shares_memory(third.values.numpy(), spare()) and torch.equal(third.keys, first_keys)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_cpu_scores_against_brute_force_with_zero_queries_and_keys(metric, rng):
    """The CPU path returns the kernel's scores: checked here against numpy brute force, not backend exact."""
    _, mem = pair(metric)
    keys, values = entries(rng, 20)
    keys[:, ::4] = 0                                                     # zero keys
    mem.add(keys, values)
    q = rng.standard_normal((B, 3, H, DK)).astype(np.float32)
    q[:, 0] = 0                                                          # a zero query
    res = mem.search(torch.from_numpy(q), 6)
    dots = np.einsum("bthd,bnhd->bthn", q, keys)
    qn, kn = np.linalg.norm(q, axis=-1)[..., None], np.linalg.norm(keys, axis=-1).transpose(0, 2, 1)[:, None]
    if metric == "ip":
        want = dots
    elif metric == "cosine":
        want = np.divide(dots, qn * kn, out=np.zeros_like(dots), where=qn * kn > 0)
    else:
        want = -np.maximum(qn ** 2 - 2 * dots + kn ** 2, 0)
    top = -np.sort(-want, -1)[..., :6]
    np.testing.assert_allclose(res.scores.numpy(), top, rtol=1e-5, atol=1e-4)
    assert res.mask.all()
    got = np.take_along_axis(want, res.ids.numpy(), -1)                  # each id's own brute-force score
    np.testing.assert_allclose(got, res.scores.numpy(), rtol=1e-5, atol=1e-4)
