"""pytest-benchmark of ``matrix_nms`` (SOLOv2 masks) and ``matrix_nms_boxes`` (PP-YOLO boxes).

Example::

    .venv/bin/python -m pytest bench/bench_nms.py --benchmark-disable -q
"""

from _op_bench import benchmark_op

test_matrix_nms = benchmark_op("matrix_nms")
test_matrix_nms_boxes = benchmark_op("matrix_nms_boxes")
