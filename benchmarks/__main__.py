"""``python -m benchmarks``: the default, small workload of every benchmark.

Exact search speed, add cost and resident size (``benchmarks.exact_speed``),
then the recall-vs-QPS sweep of every installed backend at capacity 65,536
(``benchmarks.ann``). Each writes JSON (and the sweep a PNG) to
benchmarks/results/ and prints its table.
"""

from . import ann, exact_speed

exact_speed.main([])
ann.main([])
