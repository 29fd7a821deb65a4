"""SegmentedBackend's own guarantees, on the numpy test index (so a failure here is the layer's, not a library's)."""

import numpy as np
import pytest

import kvmemory
from checks import check_result
from reference import ReferenceMemory

B, H, D = 2, 2, 4


def drive(mem, ref, rng, steps=12, tokens=(1, 30)):
    for _ in range(steps):
        t = int(rng.integers(*tokens))
        keys = rng.standard_normal((B, t, H, D)).astype(np.float32)
        values = rng.standard_normal((B, t, H, 3)).astype(np.float32)
        mem.add(keys, values)
        ref.add(keys, values)
    queries = rng.standard_normal((B, 4, H, D)).astype(np.float32)
    check_result(mem.search(queries, k=20), ref, queries, 20, exact=True)


def memory(**options):
    return kvmemory.Memory(key_dim=D, value_dim=3, capacity=50, num_heads=H, batch_size=B,
                           backend="test-segmented", **options)


def test_a_library_failure_never_hides_live_entries(tmp_path):
    rng = np.random.default_rng(0)
    mem = memory(segment_size=20, exact_below=0, fail_at=12)
    ref = ReferenceMemory(B, 50, "ip")
    with pytest.warns(RuntimeWarning, match="simulated library failure.*searched exactly from now on"):
        drive(mem, ref, rng)
    assert any(seg.indexes is None for row in mem.backend.segments for seg in row)
    mem.save(tmp_path / "m")
    loaded = kvmemory.Memory.load(tmp_path / "m")
    with pytest.warns(RuntimeWarning):
        drive(loaded, ref, rng)


def test_segments_smaller_than_exact_below_build_no_index():
    rng = np.random.default_rng(1)
    mem = memory(segment_size=10, exact_below=11)
    ref = ReferenceMemory(B, 50, "ip")
    drive(mem, ref, rng)
    assert all(seg.indexes is None for row in mem.backend.segments for seg in row)


def test_segment_size_above_capacity_is_refused():
    with pytest.raises(ValueError, match="segment_size must be an int <= 50, got 51"):
        memory(segment_size=51)


def test_library_int_options_are_bounded():
    with pytest.raises(ValueError, match="exact_below must be an int <= 2147483647"):
        memory(exact_below=2**40)


def test_saved_segment_table_must_fit_the_rows(tmp_path):
    rng = np.random.default_rng(2)
    mem = memory(segment_size=20, exact_below=0)
    drive(mem, ReferenceMemory(B, 50, "ip"), rng)
    mem.save(tmp_path / "m")
    from test_persistence import rewrite

    def corrupt(column, value):
        def change(arrays):
            table = arrays["index/segments"].copy()
            table[0, column] = value
            arrays["index/segments"] = table
        return change

    for column, value, match in [(2, 21, "does not fit row"), (0, 5, "names row 5"),
                                 (1, 10**6, "does not fit row")]:
        rewrite(tmp_path / "m", tmp_path / "bad", change_arrays=corrupt(column, value))
        with pytest.raises(ValueError, match=match):
            kvmemory.Memory.load(tmp_path / "bad")


def test_defaulted_num_threads_is_saved_unresolved(tmp_path):
    for backend in ("exact", "test-segmented"):
        mem = kvmemory.Memory(key_dim=D, capacity=8, backend=backend)
        assert mem.options["num_threads"] is None and mem.backend.num_threads >= 1
        mem.save(tmp_path / backend)
        assert kvmemory.Memory.load(tmp_path / backend).options["num_threads"] is None


def test_numpy_int_num_threads_is_saved_as_an_int(tmp_path):
    for backend in ("exact", "test-segmented"):
        mem = kvmemory.Memory(key_dim=D, capacity=8, backend=backend, num_threads=np.int64(2))
        assert type(mem.options["num_threads"]) is int
        mem.save(tmp_path / backend)
        assert kvmemory.Memory.load(tmp_path / backend).options["num_threads"] == 2


@pytest.mark.parametrize("parallel", [False, True])
def test_query_chunks_and_threaded_calls_fill_the_right_slots(parallel):
    """Fewer searches than threads: a parallel index gets all queries in one threaded call, the
    exact (newest, small) segment is split into chunks; every piece must land in its own rows and columns."""
    rng = np.random.default_rng(5)
    mem = kvmemory.Memory(key_dim=D, value_dim=3, capacity=400, num_heads=1, batch_size=1,
                          backend="test-segmented", segment_size=300, exact_below=200, num_threads=4,
                          parallel=parallel)
    ref = ReferenceMemory(1, 400, "ip")
    keys = rng.standard_normal((1, 350, 1, D)).astype(np.float32)
    values = rng.standard_normal((1, 350, 1, 3)).astype(np.float32)
    mem.add(keys, values)
    ref.add(keys, values)
    queries = rng.standard_normal((1, 128, 1, D)).astype(np.float32)
    check_result(mem.search(queries, k=20), ref, queries, 20, exact=True)
    sealed = mem.backend.segments[0][0].indexes[0]
    # two searches (one indexed segment, one exact), four threads
    assert sealed.threads_seen == ([(128, 2)] if parallel else [(32, 1)] * 4)


def test_backends_and_indices_written_to_the_older_interface_still_work(monkeypatch):
    """A plug-in index returning positions only (no ``threads``), a backend whose search has no ``with_entries``."""
    from kvmemory.registry import _REGISTRY, BackendEntry

    monkeypatch.setitem(_REGISTRY, "test-legacy", BackendEntry("test-legacy", "flat_segment:LegacySegmentedBackend",
                                                               (), None))
    rng = np.random.default_rng(6)
    mem = kvmemory.Memory(key_dim=D, value_dim=3, capacity=50, num_heads=H, batch_size=B, backend="test-legacy",
                          segment_size=20, exact_below=0, num_threads=4)
    drive(mem, ReferenceMemory(B, 50, "ip"), rng)
    with pytest.raises(TypeError):     # what the older backend cannot do is refused, not silently ignored
        mem.search(rng.standard_normal((B, 2, H, D)).astype(np.float32), k=3, with_entries=False)
