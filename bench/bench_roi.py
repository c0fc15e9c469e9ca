"""pytest-benchmark of ``roi_align`` and ``roi_upsample`` on AUNet mask-branch loads (800x1216 image).

Example::

    .venv/bin/python -m pytest bench/bench_roi.py --benchmark-disable -q
"""

from _op_bench import benchmark_op

test_roi_align = benchmark_op("roi_align")
test_roi_upsample = benchmark_op("roi_upsample")
