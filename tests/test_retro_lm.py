"""The retro_lm experiment: windows, leakage by n-gram overlap, and the --quick run at a tiny size."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.lm_memory.corpus import Document  # noqa: E402
from benchmarks.retro_lm import cli, data  # noqa: E402
from benchmarks.retro_lm.presets import PRESETS  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

P = cli.with_overrides(PRESETS["quick"], ["chunk_len=4", "seq_chunks=3", "k=1"])


def test_windows_are_chunk_aligned_and_second_halves_follow_first_halves():
    doc = Document("d", np.arange(50, dtype=np.uint8))
    w, chunks = data.windows(P, [doc])
    assert w.shape == (4, 13) and w[1, 0] == 12 and (chunks[0, 1] == [4, 5, 6, 7]).all()
    half = data.first_halves(P, [doc])[0]
    w2, _ = data.windows(P, [doc], start_fraction=0.5)
    assert len(half) == 24 and w2[0, 0] == 24          # the second half starts where the first half ends


class FakeDb:
    """chunk_tokens of ids that index a table of (neighbour + continuation) token rows."""

    def __init__(self, rows):
        self.rows = np.asarray(rows, np.uint8)

    def chunk_tokens(self, ids, continuation=True):
        ids = np.asarray(ids)
        return self.rows[np.maximum(ids, 0)], np.broadcast_to(ids[..., None] >= 0, ids.shape + (self.rows.shape[1],))


def test_leakage_counts_chunks_whose_ngrams_are_in_the_neighbours_they_read():
    p = cli.with_overrides(P, ["near_dup_ngram=2", "near_dup_fraction=0.5"])
    inputs = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]], np.uint8)
    # chunk 0's neighbour's continuation is chunk 1 itself; chunk 1's neighbour shares one 2-gram of chunk 2's three
    rows = [[0, 0, 0, 0, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0, 0, 0], [50, 51, 52, 53, 54, 55, 56, 57]]
    ev = data.EvalSet(inputs, inputs, np.array([[[0], [1], [2]]]), FakeDb(rows))
    overlap, dup, summary = cli.leakage(p, ev)
    assert overlap.tolist() == [[0.0, 1.0, pytest.approx(1 / 3)]]
    assert dup.tolist() == [[False, True, False]]
    assert summary["near_duplicate_fraction"] == 0.5 and summary["chunks_reading_neighbours"] == 2
    ev.neighbour_ids[0, 0, 0] = -1                          # no neighbour found: no overlap
    assert cli.leakage(p, ev)[0][0, 1] == 0.0


def test_overrides_are_checked():
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli.with_overrides(P, ["no_such_field=1"])
    assert cli.with_overrides(P, ["retro_layers=none"]).retro_layers is None


def test_quick_run_at_a_tiny_size(tmp_path):
    out = tmp_path / "out"
    results = cli.main(["--quick", "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
                        "--set", "steps=3", "--set", "retrofit_steps=2", "--set", "db_bytes=15000",
                        "--set", "eval_bytes=3000", "--set", "eval_max_doc_bytes=1500", "--set", "batch=2",
                        "--set", "dim=16", "--set", "encoder_dim=16"])
    with open(out / "retro_lm_quick_set.json") as f:
        saved = json.load(f)
    assert [r["name"] for r in saved["rows"]] == ["none", "retro", "none+ft", "retrofit"]
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["retrofit"]["trainable_params"] < rows["retro"]["trainable_params"]
    assert rows["none"]["second_half"] == rows["none"]["second_half_updated_db"]   # no retrieval, no change
    for r in rows.values():
        assert 0 < r["bits_per_byte"] < 9 and r["bits_per_byte_no_near_dups"] is not None
    assert 0 <= saved["leakage"]["near_duplicate_fraction"] <= 1
    assert saved["database"]["updated_chunks"] > saved["database"]["chunks"]
    assert (out / "retro_lm_quick_set.png").exists()


def test_oracle_neighbours_are_each_chunk_and_its_continuation():
    from benchmarks.retro_lm.oracle import oracle_neighbours
    x = np.arange(12, dtype=np.uint8)[None]                     # 3 chunks of 4
    nb, mask = oracle_neighbours(P, x, "cpu")
    assert nb.shape == (1, 3, 1, 8)
    assert nb[0, 0, 0].tolist() == list(range(8)) and nb[0, 1, 0].tolist() == list(range(4, 12))
    assert mask[0, :2].all() and mask[0, 2, 0, :4].all() and not mask[0, 2, 0, 4:].any()
