"""The paper's claim, measured: a kNN memory lowers a byte-level language model's loss on long documents.

See :mod:`benchmarks.lm_memory.cli` for the runs and presets; ``python -m benchmarks.lm_memory --help``.
"""
