"""The lm_memory experiment's machinery: copy-task data, document streams, resuming, and the --quick run."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.lm_memory import ablate, cli, train as train_mod  # noqa: E402
from benchmarks.lm_memory.copy_task import copy_documents  # noqa: E402
from benchmarks.lm_memory.corpus import Document, split, take_bytes  # noqa: E402
from benchmarks.lm_memory.presets import PRESETS  # noqa: E402
from benchmarks.lm_memory.stream import EvalStream, TrainStream, segments_in  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def docs_of(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [Document(f"d{i}", rng.integers(0, 256, n, dtype=np.uint8)) for i, n in enumerate(lengths)]


def test_copy_documents_repeat_earlier_passages_at_the_promised_distances():
    P, gap, near_gap = 16, (128, 256), (16, 48)
    for d in copy_documents(4, 2048, seed=3, passage=P, gap=gap, near_gap=near_gap, far=0.4, near=0.4):
        o = d.copy_offset
        assert (o >= 0).mean() > 0.2 and (o == -2).mean() > 0.2 and (o == -1).mean() > 0.1
        for pos in range(0, len(d) - P + 1, P):
            lo, hi = gap if o[pos] >= 0 else near_gap if o[pos] == -2 else (None, None)
            if lo is None:
                continue
            assert (o[pos:pos + P] == (np.arange(P) if o[pos] >= 0 else -2)).all()
            here = d.data[pos:pos + P]
            assert any((here == d.data[pos - g:pos - g + P]).all() for g in range(lo, hi + 1, P)), pos
    with pytest.raises(ValueError, match="passage <= gap"):
        copy_documents(1, 256, seed=0, passage=64, gap=(32, 64))


def test_split_is_by_document_and_seeded():
    docs = docs_of(*range(10, 30))
    train, held = split(docs, 0.25, seed=1)
    assert len(held) == 5 and {d.name for d in train}.isdisjoint(d.name for d in held)
    assert [d.name for d in split(docs, 0.25, seed=1)[1]] == [d.name for d in held]
    assert [d.name for d in split(docs, 0.25, seed=2)[1]] != [d.name for d in held]
    assert sum(map(len, take_bytes(docs, 50))) <= 50 and len(take_bytes(docs, 1)) == 1


def test_train_stream_reads_each_row_its_documents_in_order_and_resumes():
    docs = docs_of(70, 33, 2, 1, 100)       # 2 bytes: one target; 1 byte: none, skipped
    T, B = 16, 3
    stream = TrainStream(docs, B, T, seed=4)
    seen = {b: [] for b in range(B)}
    batches = [stream.next() for _ in range(40)]
    for batch in batches:
        for b in range(B):
            i = int(batch.doc_index[b])
            d = docs[i].data
            n = int(batch.valid[b].sum())
            pos = batch.position[b, :n]
            assert n >= 1 and (batch.targets[b, :n] == d[pos]).all() and (batch.inputs[b, :n] == d[pos - 1]).all()
            assert bool(batch.doc_start[b]) == (pos[0] == 1)
            assert not batch.valid[b, n:].any()
            seen[b].append((i, int(pos[0]) // T))
    for b, reads in seen.items():             # segments 0, 1, 2, ... of each document, then the next document
        for (i, s), (j, t) in zip(reads, reads[1:]):
            assert (j, t) == (i, s + 1) or (t == 0 and s == segments_in(docs[i], T) - 1)
        assert 3 not in {i for i, _ in reads}
    assert len({tuple(i for i, _ in reads[:6]) for reads in seen.values()}) > 1   # rows differ in order

    fresh = TrainStream(docs, B, T, seed=4)
    for _ in range(25):
        fresh.next()
    resumed = TrainStream(docs, B, T, seed=4)
    resumed.load_state(fresh.state())
    for batch in batches[25:]:
        again = resumed.next()
        assert (again.inputs == batch.inputs).all() and (again.doc_start == batch.doc_start).all()


def test_eval_stream_reads_every_document_once_and_whole():
    docs = docs_of(70, 33, 2, 1, 100, 50)
    stream = EvalStream(docs, 4, 16)
    got = {}
    for batch in stream:
        for b in range(4):
            if batch.doc_index[b] >= 0:
                got.setdefault(int(batch.doc_index[b]), []).extend(batch.targets[b, batch.valid[b]].tolist())
            else:
                assert batch.doc_start[b] and not batch.valid[b].any()
    assert len(stream) == sum(1 for _ in stream)
    assert got == {i: d.data[1:].tolist() for i, d in enumerate(docs) if len(d) > 1}


def test_evaluate_splits_far_copies_by_offset(monkeypatch):
    from benchmarks.lm_memory import evaluate as evaluate_mod
    from kvmemory_torch import MemorizingTransformer

    def fake_bits(model, batch, device):      # a byte at offset i of a far copy costs i + 1 bits, others 8
        offset = torch.as_tensor(batch.copy_offset.astype(np.int64))
        return torch.where(offset >= 0, offset + 1.0, 8.0), torch.as_tensor(batch.valid)

    monkeypatch.setattr(evaluate_mod, "token_bits", fake_bits)
    docs = copy_documents(3, 512, seed=4, passage=16, gap=(64, 128), far=0.5, near=0.2)
    model = MemorizingTransformer(256, dim=16, depth=1, num_heads=2)
    got = evaluate_mod.evaluate(model, docs, 2, 32, "cpu")
    assert got["copied_by_offset"] == [i + 1.0 for i in range(16)]
    offsets = np.concatenate([d.copy_offset[1:] for d in docs])
    assert got["copied_bytes"] == (offsets >= 0).sum()
    assert got["copied_bits_per_byte"] == pytest.approx((offsets[offsets >= 0] + 1).mean())
    assert got["other_bits_per_byte"] == 8.0


def test_replay_rebuilds_the_memory_of_documents_in_progress():
    preset = PRESETS["quick"]
    docs = docs_of(300, 90, 200, 130)
    spec = train_mod.RunSpec("t/mem", "t", memory=512, xl=True, steps=1)
    model = train_mod.build_model(preset, spec).eval()
    stream = TrainStream(docs, preset.batch, preset.seg_len, seed=0)
    with torch.no_grad():
        for _ in range(7):
            train_mod.token_bits(model, stream.next(), "cpu")
    want = model.knn_attention.memory.memory
    other = train_mod.build_model(preset, spec).eval()
    train_mod._replay(other, stream, "cpu")
    got = other.knn_attention.memory.memory
    # rows about to start a document are cleared by the next batch whatever they hold; the others must agree
    rows = [b for b in range(preset.batch) if stream.current(b)[1] > 0]
    assert len(rows) >= 2 and (want.size[rows] > 0).all()
    np.testing.assert_array_equal(got.size[rows], want.size[rows])
    ring_w, ring_g = want.backend.ring, got.backend.ring
    for b in rows:
        n = want.size[b]
        np.testing.assert_allclose(ring_g.keys[b, :, :n], ring_w.keys[b, :, :n], atol=1e-5)
        np.testing.assert_allclose(ring_g.values[b, :, :n], ring_w.values[b, :, :n], atol=1e-5)
    xl_w, xl_g = model.blocks[0].attention._xl, other.blocks[0].attention._xl
    assert torch.allclose(xl_w[0][rows], xl_g[0][rows], atol=1e-5) and xl_g[2][rows].all()


@pytest.mark.parametrize("carried", [False, True])
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, carried):
    # without state across segments the resumed run is the same run, bit for bit; smeared keys and dconv keep
    # the previous segment's last keys/tokens, which the replay recomputes with the checkpoint's weights: close
    preset = dataclasses.replace(PRESETS["quick"], ckpt_every=2, smear_keys=carried, dconv=3 if carried else 0)
    docs = docs_of(300, 90, 200, 130, 170)
    spec = train_mod.RunSpec("t/none", "t", steps=7, warmup=2)
    _, whole = train_mod.train(preset, spec, docs, str(tmp_path / "a"), show_progress=False)
    want = torch.load(tmp_path / "a" / "t" / "none" / "final.pt", weights_only=False)["model"]

    calls = {"n": 0}
    real = train_mod.token_bits

    def dies_at_step_5(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "token_bits", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(preset, spec, docs, str(tmp_path / "b"), show_progress=False)
    monkeypatch.setattr(train_mod, "token_bits", real)
    assert os.path.exists(tmp_path / "b" / "t" / "none" / "checkpoint.pt")
    _, resumed = train_mod.train(preset, spec, docs, str(tmp_path / "b"), show_progress=False)
    got = torch.load(tmp_path / "b" / "t" / "none" / "final.pt", weights_only=False)["model"]
    assert resumed["steps"] == whole["steps"] == 7
    for name, value in want.items():
        assert torch.equal(got[name], value) if not carried else torch.allclose(got[name], value, atol=1e-3), name


def test_quick_preset_runs_every_configuration_and_resumes(tmp_path, monkeypatch):
    args = ["--quick", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--no-progress"]
    results = cli.main(args)
    names = [r["name"] for r in results["runs"]]
    assert names[:2] == ["code/none", "code/xl"] and "code/mem-256" in names and "code/none-continued" in names
    assert any(n.startswith("code/retrofit-mem-") for n in names) and any(n.endswith("-no-xl") for n in names)
    assert any(r["kind"] == "approximate" and 0 <= r["eval"]["recall_at_k"] <= 1 for r in results["runs"])
    for r in results["runs"] + results["copy_task"]:
        assert np.isfinite(r["eval"]["bits_per_byte"]) and r["train"]["steps"] > 0
    with open(tmp_path / "out" / "lm_memory_quick.json") as f:
        assert json.load(f)["preset"]["name"] == "quick"
    assert (tmp_path / "out" / "lm_memory_quick_sizes.png").exists()
    again = cli.main(args)                                   # every run finished: read back, not retrained
    assert [r["eval"] for r in again["runs"]] == [r["eval"] for r in results["runs"]]
    ablation = ablate.main(["--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])
    memory_runs = sorted(r["name"] for r in results["runs"] if r["corpus"] == "code" and r["memory"] is not None)
    assert sorted(r["name"] for r in ablation["runs"]) == memory_runs
    for r in ablation["runs"]:                # with the memory kept empty the layer computes something else
        assert np.isfinite(r["memory_off"]) and r["memory_off"] != r["bits_per_byte"]
    assert (tmp_path / "out" / "lm_memory_ablation_quick.json").exists()
    monkeypatch.setattr(ablate, "evaluate", None)            # a second call reads each run's cached result
    assert ablate.main(["--preset", "quick", "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")])[
        "runs"] == ablation["runs"]


def test_knn_layer_is_a_preset_field_that_leaves_earlier_checkpoints_valid():
    default = PRESETS["default"]
    assert "knn_layer" not in default.key()                  # same work dir and resume key as before the field
    layer0 = cli.with_overrides(default, ["knn_layer=0"])
    assert layer0.key()["knn_layer"] == 0 and cli.default_work_dir(layer0) != cli.default_work_dir(default)
    spec = train_mod.RunSpec("code/mem-256", "code", memory=256, xl=True)
    model = train_mod.build_model(dataclasses.replace(PRESETS["quick"], knn_layer=0), spec)
    assert model.knn_layer == 0 and model.blocks[0].attention is model.knn_attention
