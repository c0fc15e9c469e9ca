"""pytest-benchmark of ``dense_crf`` (DeepLab's CRF post-processing, 21 labels) against pydensecrf.

Example::

    .venv/bin/python -m pytest bench/bench_crf.py --benchmark-disable -q
"""

from _op_bench import benchmark_op

test_dense_crf = benchmark_op("dense_crf")
