"""Multi-process training (kvmemory_torch.distributed): 2 gloo ranks on CPU equal one process on the global batch.

Each rank's memory must hold exactly its own rows (block r of the global
batch) as the single process's memory holds them; losses averaged over the
ranks must equal the single-process loss step by step; parameters must end
equal; a per-rank checkpoint must load into a fresh model and resume the
run identically.
"""

import os
import sys

import pytest
from hypothesis import given, strategies as st

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

import ddp_run  # noqa: E402
from kvmemory_torch import distributed as kd  # noqa: E402

WORLD = 2
TOL = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def close(a, b, what):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), **TOL, msg=lambda m: f"{what}: {m}")


BACKENDS = ("exact", "torch")
#: libraries whose threads make a plain fork of the test process unsafe
THREADED = ("jax", "ray", "tensorflow")


def start_method(mp) -> str:
    """fork when the test process is safe to fork (ranks start with torch imported: ~1 s); else forkserver
    (one fresh server imports torch, then forks the ranks), else spawn (re-imports torch per rank, ~10 s
    each on a loaded machine)."""
    methods = mp.get_all_start_methods()
    if "fork" in methods and not any(name in sys.modules for name in THREADED):
        return "fork"
    if "forkserver" in methods:
        mp.get_context("forkserver").set_forkserver_preload(["ddp_run"])
        return "forkserver"
    return "spawn"


@pytest.fixture(scope="module")
def ddp_records(tmp_path_factory):
    """{backend: (single-process record, [record of rank r])}: one process on the global batch, then one
    2-rank gloo run (both backends in one process group). The single runs go first: with fork the ranks
    then start with torch's lazy initialisation done."""
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    directory = tmp_path_factory.mktemp("ddp")
    singles = {b: ddp_run.run(directory / "single" / b, backend=b) for b in BACKENDS}
    mp.start_processes(ddp_run.worker, args=(WORLD, str(directory), BACKENDS), nprocs=WORLD, join=True,
                       start_method=start_method(mp))
    return {b: (singles[b], [torch.load(directory / b / f"record{r}.pt", weights_only=False) for r in range(WORLD)])
            for b in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_equals_single_process(ddp_records, backend):
    single, records = ddp_records[backend]

    # the single run resumes from its checkpoint exactly (per-rank files with world_size 1)
    close(single["resumed"], single["losses"][ddp_run.SAVE_AT:], "single-process resumed losses")

    for rank, rec in enumerate(records):
        rows = rec["rows"]
        assert rows == kd.rank_rows(ddp_run.GLOBAL_BATCH, rank, WORLD)
        close(rec["global_losses"], single["losses"], f"rank {rank}: mean loss over ranks vs single process")
        close(rec["global_resumed"], single["losses"][ddp_run.SAVE_AT:], f"rank {rank}: resumed losses")
        for name, p in single["params"].items():
            close(rec["params"][name], p, f"rank {rank}: parameter {name}")
        for when in ("saved_memory", "final_memory"):
            for name, arr in single[when].items():
                close(rec[when][name], arr[rows], f"rank {rank}: {when} {name} vs single-process rows {rows}")
        for name, arr in rec["saved_memory"].items():
            torch.testing.assert_close(rec["loaded_memory"][name], arr, rtol=0, atol=0,
                                       msg=lambda m: f"rank {rank}: loaded memory {name}: {m}")
            close(rec["resumed_memory"][name], rec["final_memory"][name], f"rank {rank}: resumed memory {name}")
    # the two ranks' memories are not trivially equal (else the row checks above prove nothing)
    assert not torch.allclose(records[0]["final_memory"]["keys"], records[1]["final_memory"]["keys"])


@given(world=st.integers(1, 8), per=st.integers(1, 16))
def test_rank_rows_partition_the_batch(world, per):
    """Every row belongs to exactly one rank, in order, and every rank has as many rows."""
    blocks = [range(world * per)[kd.rank_rows(world * per, r, world)] for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(world * per))
    assert {len(b) for b in blocks} == {per}


def test_rank_rows():
    assert [kd.rank_rows(6, r, 3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert kd.rank_rows(5) == slice(0, 5)          # no process group: one rank owns everything
    x = torch.arange(8).view(4, 2)
    assert kd.local_rows(x, 1, 2).tolist() == [[4, 5], [6, 7]]


@pytest.mark.parametrize("call, match", [
    (lambda: kd.rank_rows(5, 0, 2), "global_batch=5 must be divisible by world_size=2"),
    (lambda: kd.rank_rows(4, 2, 2), r"rank must be an int in \[0, world_size=2\), got 2"),
    (lambda: kd.rank_rows(4, 0, 0), "world_size must be a positive int, got 0"),
    (lambda: kd.rank_rows(0, 0, 1), "global_batch must be a positive int, got 0"),
])
def test_rank_rows_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_checkpoint_world_size_mismatch(tmp_path):
    model, optimizer = ddp_run.build()
    tokens, starts = ddp_run.data()
    ddp_run.train(model, optimizer, tokens, starts, range(1), kd.rank_rows(ddp_run.GLOBAL_BATCH, 0, 2))
    kd.save_checkpoint(tmp_path, model, optimizer, rank=0, world_size=2)
    with pytest.raises(ValueError, match="written by 2 ranks, this run has world_size=1"):
        kd.load_checkpoint(tmp_path, model, optimizer)
    with pytest.raises(FileNotFoundError, match="no state for rank 1"):
        kd.load_checkpoint(tmp_path, model, optimizer, rank=1, world_size=2)
    assert os.path.exists(tmp_path / "rank0" / "memory0.npz")
