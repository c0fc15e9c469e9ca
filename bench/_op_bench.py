"""Shared body of the pytest-benchmark files: one test per case x dtype x backend of an op.

The cases come from ``fastseg.bench``, so ``make bench``, ``bench/gpu_check.sh`` and these files
measure the same shapes; ``reference`` is the eager PyTorch baseline from ``fastseg.ops._reference``.
Every other backend is first checked against it (float64 oracle, the ratio rule of
``fastseg.bench.check_backend``). Backends that cannot run here are skipped with the reason from
``fastseg.ops.backend_status()``. ``FASTSEG_BENCH_QUICK=1`` keeps the CI subset.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fastseg import ops
from fastseg.bench import DEFAULT_DTYPES, Case, check_case, get_cases, peak_memory_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTSEG_BENCH_QUICK", "0") == "1"
DTYPES = DEFAULT_DTYPES[DEVICE.type]
BACKENDS = ops.BACKENDS  # reference (the eager baseline), cpu, cuda, triton


def _skip_reason(op: str, backend: str) -> str | None:
    if backend == "reference":
        return None
    why = ops.backend_status(DEVICE)[op][backend]
    if why != "ok":
        return why
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the Triton interpreter is a correctness tool, never benchmarked"
    return None


def _callable(case: Case, inputs: dict[str, Any], backend: str) -> Callable[[], Any]:
    run = case.baseline if backend == "reference" else (lambda i: case.run(i, backend))
    grad_mode = torch.no_grad if case.mode == "fwd" else torch.enable_grad

    def call() -> Any:
        with grad_mode():
            out = run(inputs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    return call


def benchmark_op(op: str) -> Callable[..., None]:
    """A pytest-benchmark test over ``op``'s cases x dtypes x backends (assign it to ``test_<op>``)."""

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("case", get_cases(op, batch=1, quick=QUICK), ids=lambda c: c.id)
    def test(benchmark: Any, case: Case, dtype: torch.dtype, backend: str) -> None:
        why = _skip_reason(op, backend)
        if why is not None:
            pytest.skip(why)
        inputs = case.make_inputs(DEVICE, dtype)
        if backend != "reference":
            res = check_case(case, inputs, backend, dtype)
            assert res.ok, f"{case.label} {dtype} {backend}: {res.message}"
        benchmark.group = f"{case.label} [{str(dtype).removeprefix('torch.')}]"
        benchmark.extra_info.update({"shape": case.params.get("shape"), "layer": case.params.get("layer"),
                                     "mode": case.mode, "backend": backend, "device": str(DEVICE)})
        benchmark(_callable(case, inputs, backend))

    return test


def test_peak_memory_probe() -> None:
    """The harness's peak-memory measurement: a plain matmul's peak is exactly its output's size."""
    a = torch.randn(300, 200, device=DEVICE)
    b = torch.randn(200, 100, device=DEVICE)
    _ = a @ b  # warm-up (cuBLAS workspace)
    assert peak_memory_bytes(lambda: a @ b, DEVICE) == 300 * 100 * 4
