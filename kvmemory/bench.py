"""The ``kvmemory-bench`` console script: ``python -m benchmarks`` from a source checkout.

The benchmarks are not part of the installed package (they live in the
repository's ``benchmarks/`` folder, beside ``kvmemory/``), so the script
works for an editable or in-place install (``pip install -e ".[bench]"``)
and says so otherwise.
"""

from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "cli.py")):
        raise SystemExit(f"kvmemory-bench runs the benchmarks of a source checkout, and {root} has no "
                         f"benchmarks/cli.py: clone the repository and pip install -e '.[bench]' there")
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.cli import main as bench_main

    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main())
