"""The memory sharded over 4 host devices along the batch: equal to one device, and nothing crosses devices.

The checks run in a subprocess (tests/sharded_checks.py), where
XLA_FLAGS=--xla_force_host_platform_device_count=4 is set before jax is imported.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax")

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_FOR_MEMORY = {"all-gather", "all-to-all", "collective-permute", "all_gather", "all_to_all", "collective_permute"}


@pytest.fixture(scope="module")
def checks():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_checks.py")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices(checks):
    assert checks["devices"] == 4


@pytest.mark.parametrize("what", ["state", "search", "search_tiled", "search_bins"])
def test_sharded_equals_one_device_and_stays_sharded(checks, what):
    assert checks[f"l2/{what}_equal"]
    assert checks[f"l2/{what}_sharded" if what == "state" else f"l2/{what}_out_sharded"]


@pytest.mark.parametrize("op", ["add", "clear", "search", "search_tiled", "search_bins"])
def test_add_search_clear_have_no_collective(checks, op):
    """per_shard (shard_map) programs: no collective at all, in the lowered or the compiled text."""
    assert checks[f"collectives/{op}"] == {"lowered": [], "compiled": []}


def test_scanned_sharded_train_step_equals_one_device(checks):
    """The example's jitted lax.scan train step, batch and memory split over 4 devices: the same losses,
    the memory stays sharded, and the only collective is the gradients' all-reduce (none touches the memory)."""
    assert checks["train/losses_sharded"] == pytest.approx(checks["train/losses_one_device"], rel=1e-5)
    assert checks["train/losses_sharded_loop"] == pytest.approx(checks["train/losses_one_device"], rel=1e-5)
    assert checks["train/memory_sharded"]
    assert not set(checks["train/collectives"]) & NOT_FOR_MEMORY, checks["train/collectives"]
    assert checks["train/memory_collectives"] == []
