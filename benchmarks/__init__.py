"""kvmemory benchmarks: python -m benchmarks.exact_speed, python -m benchmarks.ann (see README.md)."""
