"""pytest-benchmark of ``fastseg.ops.separable_conv2d`` (DeepLabv3+ / Xception-65 shapes at 513x513).

Example::

    .venv/bin/python -m pytest bench/bench_separable_conv.py                              # time
    .venv/bin/python -m pytest bench/bench_separable_conv.py --benchmark-disable -q        # run once
"""

from _op_bench import benchmark_op, test_peak_memory_probe  # noqa: F401

test_separable_conv2d = benchmark_op("separable_conv2d")
