"""Timing: the median and interquartile range of repeated calls after warm-up.

CPU: ``time.perf_counter`` with the number of repetitions fitted to a time budget per measurement.
GPU: ``triton.testing.do_bench`` (L2 flushed before each run), or CUDA events when Triton is absent.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Timing", "pool", "time_fn", "time_once"]


@dataclass
class Timing:
    """Per-call times in milliseconds: median, quartiles, and the number of timed samples."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int
    method: str
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range."""
        return self.q3_ms - self.q1_ms


def _quartiles(samples: Sequence[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


def _time_cpu(fn: Callable[[], Any], budget_s: float, min_reps: int, warmup: int = 2) -> Timing:
    t0 = time.perf_counter()
    fn()
    if warmup == 0:  # the first call is the whole warm-up (calls of seconds: a model); it gives the estimate
        n, t1 = 1, t0
    else:
        # Warm-up: at least `warmup` more calls and ~10% of the budget.
        n, t1 = 0, time.perf_counter()
        while n < warmup or (time.perf_counter() - t1 < 0.1 * budget_s and n < 100):
            fn()
            n += 1
    est = max((time.perf_counter() - t1) / n, 1e-7)
    inner = max(1, math.ceil(1e-3 / est))  # calls per sample: a sample lasts at least ~1 ms
    reps = int(min(max(budget_s / (est * inner), min_reps), 10_000))
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner * 1e3)
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, reps, "perf_counter" + (f" ({inner} calls/sample)" if inner > 1 else ""), samples)


def _time_cuda_events(fn: Callable[[], Any], budget_s: float, min_reps: int) -> Timing:
    cache = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(0.25 * budget_s * 1e3 / est))):
        fn()
    reps = int(min(max(budget_s * 1e3 / est, min_reps), 10_000))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        cache.zero_()  # flush L2
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, reps, "cuda events", samples)


def _time_cuda(fn: Callable[[], Any], budget_s: float, min_reps: int) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_cuda_events(fn, budget_s, min_reps)
    warmup, rep = max(1, int(budget_s * 250)), max(1, int(budget_s * 1000))
    try:
        samples = [float(v) for v in do_bench(fn, warmup=warmup, rep=rep, return_mode="all")]
        q1, med, q3 = _quartiles(samples)
        return Timing(med, q1, q3, len(samples), "triton do_bench", samples)
    except (AssertionError, TypeError, ValueError):  # an older Triton without return_mode="all"
        q1, med, q3 = (float(v) for v in do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.25, 0.5, 0.75]))
        return Timing(med, q1, q3, -1, "triton do_bench (quantiles)")


def time_fn(fn: Callable[[], Any], device: torch.device, budget_s: float = 0.5, min_reps: int = 5,
            warmup: int = 2) -> Timing:
    """Median/IQR of ``fn()`` after warm-up, spending about ``budget_s`` seconds on the timed runs.
    ``warmup``: untimed calls after the first one, on CPU (0: the first call only; the GPU's warm-up is a
    share of the budget)."""
    if device.type == "cuda":
        return _time_cuda(fn, budget_s, min_reps)
    return _time_cpu(fn, budget_s, min_reps, warmup)


def time_once(fn: Callable[[], Any], device: torch.device) -> Timing:
    """One timed call and no untimed one: for a function too slow for more, already warmed up by the
    calls of the correctness check. The quartiles are the call's time."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end)
    else:
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
    return Timing(ms, ms, ms, 1, "single call (measured once)", [ms])


def pool(parts: Sequence[Timing]) -> Timing:
    """One Timing from the samples of several (interleaved) measurements of the same function."""
    samples = [v for t in parts for v in t.samples_ms]
    if len(parts) == 1 or not samples:
        return parts[0]
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, len(samples), f"{parts[0].method}, {len(parts)} interleaved rounds", samples)
