"""Random sequences of add / search / clear / save-load against the reference model, for every installed backend."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import kvmemory
from checks import EXACT_BACKENDS, ID_DTYPES, check_result, to_numpy
from conftest import backend_options, installed_backends
from reference import ReferenceMemory

DIM = 4


# besides every installed backend at its defaults: faiss' centred HNSW graphs, and a factory
# string (its scores are not trusted, so results are re-scored from the ring)
VARIANTS = [(name, {}) for name in installed_backends()] + [
    ("faiss", options) for options in ({"index": "hnsw"}, {"index": "HNSW8,Flat"})
    if "faiss" in installed_backends()]


class MemoryMachine(RuleBasedStateMachine):
    backend = "exact"
    extra_options = {}
    tmp_path = None

    @initialize(
        batch=st.integers(1, 3), heads=st.integers(1, 2), capacity=st.integers(1, 12),
        metric=st.sampled_from(kvmemory.METRICS), value_dim=st.integers(1, 3),
    )
    def setup(self, batch, heads, capacity, metric, value_dim):
        self.batch, self.heads = batch, heads
        self.mem = kvmemory.Memory(
            key_dim=DIM, value_dim=value_dim, capacity=capacity, num_heads=heads, batch_size=batch,
            backend=self.backend, metric=metric, **backend_options(self.backend, capacity), **self.extra_options,
        )
        self.ref = ReferenceMemory(batch, capacity, metric)
        self.rng = np.random.default_rng(0)
        self.saves = 0

    def _array(self, tokens, dim, integers):
        shape = (self.batch, tokens, self.heads, dim)
        if integers:  # small integers: many exact ties and zero vectors
            return self.rng.integers(-2, 3, shape).astype(np.float32)
        return self.rng.standard_normal(shape).astype(np.float32)

    @rule(tokens=st.integers(0, 20), integers=st.booleans())
    def add(self, tokens, integers):
        keys = self._array(tokens, DIM, integers)
        values = self._array(tokens, self.mem.value_dim, False)
        self.mem.add(keys, values)
        self.ref.add(keys, values)

    @rule(tokens=st.integers(1, 3), k=st.integers(1, 16), integers=st.booleans())
    def search(self, tokens, k, integers):
        queries = self._array(tokens, DIM, integers)
        res = self.mem.search(queries, k=k)
        check_result(res, self.ref, queries, k, exact=self.backend in EXACT_BACKENDS,
                     id_dtype=ID_DTYPES.get(self.backend, np.int64))

    @rule(data=st.data())
    def clear(self, data):
        rows = data.draw(st.lists(st.integers(0, self.batch - 1), unique=True, max_size=self.batch))
        self.mem.clear(rows)
        self.ref.clear(rows)

    @rule()
    def clear_all(self):
        self.mem.clear()
        self.ref.clear(range(self.batch))

    @rule()
    def save_load(self):
        path = self.tmp_path / f"mem{self.saves}.kvm"
        self.saves += 1
        self.mem.save(path)
        self.mem = kvmemory.Memory.load(path)

    @invariant()
    def sizes_agree(self):
        if hasattr(self, "mem"):
            np.testing.assert_array_equal(to_numpy(self.mem.size), self.ref.size())


@pytest.mark.parametrize("backend,options", VARIANTS, ids=[f"{b}{o or ''}" for b, o in VARIANTS])
def test_random_operation_sequences(backend, options, tmp_path):
    machine = type(f"{backend}Machine", (MemoryMachine,),
                   {"backend": backend, "extra_options": options, "tmp_path": tmp_path})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=60, stateful_step_count=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]),
    )
