"""pytest-benchmark of DANet's ``position_attention`` and ``channel_attention`` (ResNet-101, OS8).

Example::

    .venv/bin/python -m pytest bench/bench_attention.py --benchmark-disable -q
"""

from _op_bench import benchmark_op

test_position_attention = benchmark_op("position_attention")
test_channel_attention = benchmark_op("channel_attention")
