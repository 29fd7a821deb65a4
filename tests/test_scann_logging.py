"""ScaNN's C++ INFO lines (one or two per tree build) stay off stderr; warnings still pass; the level is settable."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("scann")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a memory whose segments build ScaNN trees (tree_min_size is tiny), then a search
SCRIPT = """
import numpy as np
from kvmemory import Memory
m = Memory(key_dim=8, capacity=4096, num_heads=1, batch_size=1, backend="scann",
           tree_min_size=256, exact_below=0, segment_size=2048)
rng = np.random.default_rng(0)
for _ in range(6):
    m.add(rng.standard_normal((1, 512, 1, 8), dtype=np.float32), rng.standard_normal((1, 512, 1, 8), dtype=np.float32))
print(m.search(rng.standard_normal((1, 4, 1, 8), dtype=np.float32), 4).ids.shape)
"""
INFO = re.compile(r"^I\d{4} ", re.M)


def run(**env):
    full = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env}
    for name in ("KVMEMORY_SCANN_LOG_LEVEL", "TF_CPP_MIN_LOG_LEVEL"):
        if name not in env:
            full.pop(name, None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 4, 1, 4)"
    return out.stderr


def test_no_info_lines_by_default():
    stderr = run()
    assert not INFO.search(stderr), stderr


def test_level_zero_shows_them():
    """The control: the same script does log INFO lines when asked to (so the test above can fail)."""
    assert INFO.search(run(KVMEMORY_SCANN_LOG_LEVEL="0"))


def test_bad_level():
    from kvmemory.backends.scann import quiet_scann_logs

    with pytest.raises(ValueError, match="ScaNN log level must be 0-3 .* got 7"):
        quiet_scann_logs(7)
