"""benchmarks.step: the tuned (recall-target) variants, the port adapter's layout, a whole tiny run."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")

import kvmemory  # noqa: E402
from benchmarks import port as port_mod  # noqa: E402
from benchmarks import step  # noqa: E402


class ExactPort:
    """A stand-in for the port's KNNMemory with its interface, searching exactly (by brute force)."""

    def __init__(self, dim, max_memories, num_indices, memmap_filename):
        self.db = np.zeros((num_indices, max_memories, 2, dim), np.float32)
        self.n = 0

    def add(self, memories):
        m = memories.numpy()
        self.db[:, self.n:self.n + m.shape[1]] = m
        self.n += m.shape[1]

    def search(self, queries, topk):
        import torch
        q = queries.numpy()
        s = np.einsum("itd,ind->itn", q, self.db[:, :self.n, 0])
        top = np.argsort(-s, -1)[..., :topk]
        kv = np.take_along_axis(self.db[:, None, :self.n], top[..., None, None], 2)   # [I, T, k, 2, D]
        return torch.from_numpy(kv), torch.ones(top.shape, dtype=torch.bool)


def test_port_adapter_maps_rows_and_heads_like_memory():
    B, H, D, n, T, k = 2, 3, 8, 40, 5, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, n, H, D)).astype(np.float32)
    v = rng.standard_normal((B, n, H, D)).astype(np.float32)
    q = rng.standard_normal((B, T, H, D)).astype(np.float32)
    port = port_mod.PortMemory(B, H, D, n, knn_class=ExactPort)
    port.add(x[:, :25], v[:, :25])
    port.add(x[:, 25:], v[:, 25:])
    ref = kvmemory.Memory(backend="exact", key_dim=D, capacity=n, num_heads=H, batch_size=B)
    ref.add(x, v)
    want, got = ref.search(q, k), port.search(q, k)
    np.testing.assert_array_equal(got.keys, want.keys)
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_allclose(port.exact_scores(q, k), want.scores, rtol=1e-5, atol=1e-5)
    assert step.recall(got, port.exact_scores(q, k), q, k) == 1.0


def test_port_adapter_without_the_port_names_the_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_port(name, *a, **kw):
        if name.startswith("memorizing_transformers_pytorch"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_port)
    with pytest.raises(ImportError, match="pip install --no-deps memorizing-transformers-pytorch"):
        port_mod.load_port_class()


class ResettingPort(ExactPort):
    """As the port: an index that would pass max_memories is reset; here that is an error the test sees."""

    def __init__(self, dim, max_memories, num_indices, memmap_filename):
        super().__init__(dim, max_memories, num_indices, memmap_filename)
        self.max_memories = max_memories

    def add(self, memories):
        if self.n + memories.shape[1] > self.max_memories:
            raise AssertionError(f"port would reset: {self.n} + {memories.shape[1]} > {self.max_memories}")
        super().add(memories)


@pytest.mark.parametrize("capacity", [64, 1024])
def test_port_never_resets_during_a_run(capacity, tmp_path, monkeypatch):
    monkeypatch.setattr(port_mod, "load_port_class", lambda: ResettingPort)
    out = step.main(["--capacities", str(capacity), "--batch", "1", "--heads", "2", "--tokens", "128", "-k", "8",
                     "--repeats", "2", "--backends", "exact,port", "--data", "synthetic", "--out-dir", str(tmp_path)])
    row = out["results"][0]["backends"]["port"]
    assert row["recall"] == 1.0                                   # the stand-in searches exactly
    assert max(row["entries_searched"]) <= max(capacity, 8 + 2 * 128)


def test_tuning_grids_are_cheaper_than_the_defaults():
    mem = kvmemory.Memory(backend="exact", key_dim=8, capacity=64)
    assert step.tuning_grid("exact", mem.options) == []
    assert all(p["ef"] >= 32 for p in step.tuning_grid("hnsw", {}))
    assert step.tuning_grid("faiss", {"index": "Flat", "nprobe": 16, "ef_search": 64}) == []
    ivf = step.tuning_grid("faiss", {"index": "ivf", "nlist": 724, "nprobe": 81, "ef_search": 64})
    assert [p["nprobe"] for p in ivf] == [20, 27, 40, 54]
    assert [p["ef_search"] for p in step.tuning_grid("faiss", {"index": "hnsw", "ef_search": 64})] == [16, 21, 32, 42]
    scann = step.tuning_grid("scann", {"num_leaves": 181, "num_leaves_to_search": 23})
    assert {p["num_leaves_to_search"] for p in scann} == {7, 11, 15} and {p["reorder"] for p in scann} == {64, 128}


class RecallStub:
    """A memory whose recall falls as its one search option ``nprobe`` falls (and whose search time does too)."""

    def __init__(self):
        self.options = {"index": "ivf", "nlist": 96, "nprobe": 24}
        self.calls = []

    def set_search_options(self, nprobe):
        self.options["nprobe"] = 24 if nprobe is None else nprobe
        self.calls.append(nprobe)


def test_tune_picks_the_fastest_setting_reaching_the_target(monkeypatch):
    mem = RecallStub()
    monkeypatch.setattr(mem, "search", lambda q, k, with_entries=True: mem.options["nprobe"], raising=False)
    monkeypatch.setattr(step, "time_call", lambda fn: float(fn()))          # time = nprobe
    monkeypatch.setattr(step, "recall", lambda nprobe, truth, q, k: nprobe / 16)  # nprobe 6 .. 16 -> 0.375 .. 1
    tuned = step.tune("faiss", mem, None, 32, None, 0.7)
    assert [p["search"]["nprobe"] for p in tuned["points"]] == [6, 8, 12, 16]
    assert tuned["chosen"]["search"] == {"nprobe": 12}                     # 0.75 >= 0.7, fastest such
    assert tuned["chosen"]["recall"] == 0.75
    assert mem.options["nprobe"] == 24 and mem.calls[-1] is None           # defaults restored
    assert step.tune("faiss", mem, None, 32, None, 1.01)["chosen"] is None


class Spy:
    """A memory with hnsw's search option ``ef``: records the option in force at each search, counts adds."""

    def __init__(self, inner):
        self.inner, self.options, self.searches, self.adds = inner, {"ef": 64}, [], 0

    def set_search_options(self, ef):
        self.options["ef"] = 64 if ef is None else ef

    def search(self, q, k, with_entries=True):
        self.searches.append(self.options["ef"])
        return self.inner.search(q, k, with_entries=with_entries)

    def add(self, keys, values):
        self.adds += 1
        self.inner.add(keys, values)


def test_timed_rounds_apply_each_labels_options_and_add_once_per_round(tmp_path, monkeypatch):
    spies = []

    def make(names, capacity, args, baseline):
        shape = dict(key_dim=args.dim, capacity=capacity, num_heads=args.heads, batch_size=args.batch)
        spies.append(Spy(kvmemory.Memory(backend="exact", **shape)))
        return {"exact": kvmemory.Memory(backend="exact", **shape), "hnsw": spies[-1]}, {}

    monkeypatch.setattr(step, "make_memories", make)
    repeats = 3
    out = step.main(["--capacities", "256", "--batch", "1", "--heads", "2", "--tokens", "64", "-k", "8",
                     "--repeats", str(repeats), "--data", "synthetic", "--out-dir", str(tmp_path)])
    r, spy = out["results"][0], spies[0]
    chosen = r["tuning"]["hnsw"]["chosen"]["search"]["ef"]               # every setting has recall 1
    assert set(r["backends"]) == {"exact", "hnsw", "hnsw@0.9"}
    assert spy.adds == 256 // 64 + 1 + repeats                            # fill, then one add per round
    rounds = spy.searches[-(1 + repeats) * 4:]                            # 2 labels x (search, full search)
    for i in range(1 + repeats):
        assert sorted(rounds[4 * i:4 * i + 4]) == sorted([64, 64, chosen, chosen])
        assert rounds[4 * i] == rounds[4 * i + 1] and rounds[4 * i + 2] == rounds[4 * i + 3]
    assert r["backends"]["hnsw"]["options"]["ef"] == 64 and r["backends"]["hnsw@0.9"]["options"]["ef"] == chosen
    assert r["backends"]["hnsw"]["add_s"] == r["backends"]["hnsw@0.9"]["add_s"]
    assert step.label_order(r) == ["exact", "hnsw", "hnsw@0.9"]


def test_tiny_step_run_writes_its_table(tmp_path):
    pytest.importorskip("hnswlib")
    out = step.main(["--capacities", "2048", "--batch", "1", "--heads", "2", "--tokens", "128", "-k", "8",
                     "--repeats", "1", "--backends", "exact,hnsw", "--data", "synthetic",
                     "--out-dir", str(tmp_path)])
    r = out["results"][0]
    rows = r["backends"]
    assert set(rows) == {"exact", "hnsw", "hnsw@0.9"}
    assert rows["exact"]["recall"] == 1.0 and rows["exact"]["step_over_exact"] == 1.0
    for row in rows.values():
        assert row["step"]["median_s"] > 0 and row["search_s"] > 0 and row["add_s"] > 0
    tuned = r["tuning"]["hnsw"]
    assert [p["search"] for p in tuned["points"]] == [{"ef": 32}, {"ef": 40}, {"ef": 48}]
    assert tuned["chosen"] is not None and rows["hnsw@0.9"]["recall"] == tuned["chosen"]["recall"] >= 0.9
    assert rows["hnsw@0.9"]["options"]["ef"] == tuned["chosen"]["search"]["ef"]
    assert rows["hnsw"]["options"]["ef"] == 64                            # the default label keeps the default
    saved = json.load(open(tmp_path / "step.json"))
    assert saved["results"][0]["capacity"] == 2048
    assert os.path.exists(tmp_path / "step.png") or saved["plot"] is None
