"""Bad input: a clear error naming the argument, and the memory left exactly as it was."""

import numpy as np
import pytest

import kvmemory
import kvmemory.registry
from conftest import backend_options, installed_backends

B, H, D, DV = 2, 2, 4, 3


def make(backend="exact"):
    mem = kvmemory.Memory(key_dim=D, value_dim=DV, capacity=6, num_heads=H, batch_size=B,
                          backend=backend, **backend_options(backend, 6))
    rng = np.random.default_rng(0)
    mem.add(rng.standard_normal((B, 4, H, D)).astype(np.float32),
            rng.standard_normal((B, 4, H, DV)).astype(np.float32))
    return mem


def snapshot(mem):
    def plain(v):
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.array(v, copy=True)

    return {k: plain(v) for k, v in mem.backend.state_dict().items()}


def assert_unchanged(mem, before):
    after = snapshot(mem)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def keys_(t=2):
    return np.ones((B, t, H, D), np.float32)


def values_(t=2):
    return np.ones((B, t, H, DV), np.float32)


def with_nan(a, value=np.nan):
    a = a.copy()
    a[-1, -1, -1, -1] = value
    return a


BAD_ADDS = [  # (message pattern, error type, (keys, values))
    ("keys must have 4 dims", ValueError, lambda: (np.ones((B, 2, D), np.float32), values_())),
    ("axis 0 \\(batch\\) must be 2, got 3", ValueError, lambda: (np.ones((3, 2, H, D), np.float32), values_())),
    ("axis 2 \\(heads\\) must be 2, got 1", ValueError, lambda: (np.ones((B, 2, 1, D), np.float32), values_())),
    ("axis 3 \\(key_dim\\) must be 4, got 5", ValueError, lambda: (np.ones((B, 2, H, 5), np.float32), values_())),
    ("values axis 3 \\(value_dim\\) must be 3, got 4", ValueError, lambda: (keys_(), np.ones((B, 2, H, 4), np.float32))),
    ("values axis 1 \\(tokens\\) must be 2, got 3", ValueError, lambda: (keys_(), values_(3))),
    ("keys contains NaN or inf", ValueError, lambda: (with_nan(keys_()), values_())),
    ("values contains NaN or inf", ValueError, lambda: (keys_(), with_nan(values_(), np.inf))),
    ("keys contains NaN or inf", ValueError, lambda: (keys_().astype(np.float64) * 1e300, values_())),
    ("keys must have a float dtype .* got int64", TypeError, lambda: (keys_().astype(np.int64), values_())),
    ("keys must have a float dtype .* got <U", TypeError, lambda: (np.full((B, 2, H, D), "a"), values_())),
    ("values must have a float dtype .* got bool", TypeError, lambda: (keys_(), values_().astype(bool))),
]


@pytest.mark.parametrize("backend", installed_backends())
@pytest.mark.parametrize("match, error, make_args", BAD_ADDS, ids=[f"{i}-{a[0][:24]}" for i, a in enumerate(BAD_ADDS)])
def test_bad_add_is_refused_and_changes_nothing(backend, match, error, make_args):
    mem = make(backend)
    before = snapshot(mem)
    keys, values = make_args()
    with pytest.raises(error, match=match):
        mem.add(keys, values)
    assert_unchanged(mem, before)


@pytest.mark.parametrize("backend", installed_backends())
def test_bad_search_is_refused(backend):
    mem = make(backend)
    before = snapshot(mem)
    q = np.ones((B, 1, H, D), np.float32)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        mem.search(q, k=0)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        mem.search(q, k=2.0)
    with pytest.raises(TypeError, match="k must be an int, got bool"):
        mem.search(q, k=True)
    with pytest.raises(ValueError, match="queries contains NaN or inf"):
        mem.search(with_nan(q), k=2)
    with pytest.raises(ValueError, match="queries axis 3 \\(key_dim\\) must be 4, got 3"):
        mem.search(np.ones((B, 1, H, 3), np.float32), k=2)
    with pytest.raises(TypeError, match="with_entries must be a bool, got int 0"):
        mem.search(q, k=2, with_entries=0)
    assert_unchanged(mem, before)


def test_bad_clear_rows():
    mem = make()
    before = snapshot(mem)
    with pytest.raises(ValueError, match=r"rows must be in \[0, 2\), got \[2\]"):
        mem.clear(2)
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        mem.clear([0, -1])
    with pytest.raises(ValueError, match=r"bool mask must have shape \(2,\), got \(3,\)"):
        mem.clear(np.array([True, False, True]))
    with pytest.raises(TypeError, match="rows must be"):
        mem.clear([0.5])
    with pytest.raises(TypeError, match="got bool"):
        mem.clear(True)
    assert_unchanged(mem, before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"capacity": 0}, ValueError, "capacity must be >= 1, got 0"),
    ({"capacity": 2.5}, TypeError, "capacity must be an int, got float"),
    ({"key_dim": 0}, ValueError, "key_dim must be >= 1"),
    ({"num_heads": -1}, ValueError, "num_heads must be >= 1"),
    ({"batch_size": True}, TypeError, "batch_size must be an int, got bool"),
    ({"metric": "dot"}, ValueError, "metric must be one of \\('ip', 'cosine', 'l2'\\), got 'dot'"),
    ({"backend": "annoy"}, ValueError, "backend must be one of .*'exact'.* got 'annoy'"),
    ({"backend": None}, ValueError, "backend must be one of"),
    ({"ef": 10}, ValueError, "unknown option\\(s\\) \\['ef'\\] for backend 'exact'; valid options: \\['block_bytes', 'num_threads'\\]"),
    ({"block_bytes": 0}, ValueError, "block_bytes must be an int >= 1, got 0"),
    ({"num_threads": -2}, ValueError, "num_threads must be an int >= 1, got -2"),
    ({"num_threads": 0}, ValueError, "num_threads must be an int >= 1, got 0"),
])
def test_bad_construction(kwargs, error, match):
    args = {"key_dim": 4, **kwargs}
    with pytest.raises(error, match=match):
        kvmemory.Memory(**args)


@pytest.mark.parametrize("backend", sorted({"faiss", "scann", "hnsw"} & set(installed_backends())))
@pytest.mark.parametrize("option, value, minimum", [
    ("segment_size", 0, 1), ("num_threads", 0, 1), ("exact_below", -1, 0), ("segment_size", 2.0, 1),
])
def test_segmented_options_are_checked_not_defaulted(backend, option, value, minimum):
    with pytest.raises(ValueError, match=rf"{option} must be an int >= {minimum}, got {value!r}"):
        kvmemory.Memory(key_dim=4, capacity=16, backend=backend, **{option: value})


def test_unknown_search_option():
    mem = make()
    with pytest.raises(ValueError, match="unknown search option\\(s\\) \\['ef'\\]"):
        mem.set_search_options(ef=3)


def test_missing_library_names_the_extra(monkeypatch):
    kvmemory.register_backend("needs-missing", "nowhere:Backend", requires=("no_such_module_xyz",),
                              extra="nosuch")
    assert kvmemory.available_backends()["needs-missing"] is False
    with pytest.raises(ImportError, match=r"pip install 'kvmemory\[nosuch\]'"):
        kvmemory.Memory(key_dim=4, backend="needs-missing")
    del kvmemory.registry._REGISTRY["needs-missing"]


@pytest.mark.parametrize("backend, module, extra", [
    ("faiss", "faiss", "faiss"), ("scann", "scann", "scann"), ("hnsw", "hnswlib", "hnsw"), ("torch", "torch", "torch"),
])
def test_builtin_backend_without_its_library(backend, module, extra, monkeypatch):
    real = kvmemory.registry.importlib.util.find_spec
    monkeypatch.setattr(kvmemory.registry.importlib.util, "find_spec",
                        lambda name, *a: None if name == module else real(name, *a))
    with pytest.raises(ImportError, match=rf"{module!r} module.*pip install 'kvmemory\[{extra}\]'"):
        kvmemory.Memory(key_dim=4, backend=backend)
