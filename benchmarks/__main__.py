"""``python -m benchmarks``: the default, small workload of the main benchmarks (see benchmarks/cli.py, --help)."""

import sys

from .cli import main

sys.exit(main())
