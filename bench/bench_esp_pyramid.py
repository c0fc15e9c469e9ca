"""pytest-benchmark of ``fastseg.ops.esp_pyramid`` (ESPNet shapes at 1024x512).

Example::

    .venv/bin/python -m pytest bench/bench_esp_pyramid.py                              # time
    .venv/bin/python -m pytest bench/bench_esp_pyramid.py --benchmark-disable -q        # run once
"""

from _op_bench import benchmark_op, test_peak_memory_probe  # noqa: F401

test_esp_pyramid = benchmark_op("esp_pyramid")
