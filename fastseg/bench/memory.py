"""Peak memory of one call: the peak of bytes allocated on top of what was live before it.

GPU: ``torch.cuda.max_memory_allocated`` delta. CPU: ``torch.profiler`` with ``profile_memory=True``,
the cumulative sum of its allocation events in time order (only allocations through PyTorch's allocator
are seen: a kernel's ``std::vector`` scratch is not).
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["memory_probe", "peak_memory_bytes"]


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (Kineto prints start/stop lines from C++); Python errors still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    # No cycle collection during the call (it could free tensors allocated before it and hide part of the
    # call's peak). Disabled rather than run beforehand: a full gc.collect() takes a second or more on the
    # bench's heap on a busy machine, twice a case.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    finally:
        if was_enabled:
            gc.enable()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns() if hasattr(e, "start_ns") else e.start_us())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _cuda_peak_bytes(fn: Callable[[], Any]) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` on top of what was allocated before (outputs included)."""
    return _cuda_peak_bytes(fn) if device.type == "cuda" else _cpu_peak_bytes(fn)


def memory_probe(device: torch.device) -> dict[str, Any]:
    """Sanity check of the memory measurement: a plain matmul's peak must equal its output's size."""
    a = torch.randn(512, 256, device=device)
    b = torch.randn(256, 384, device=device)
    expected = 512 * 384 * 4
    try:
        _ = a @ b  # warm-up: cuBLAS allocates its workspace once, on first use
        del _
        got = peak_memory_bytes(lambda: a @ b, device)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": got == expected, "matmul_peak_bytes": got, "matmul_output_bytes": expected}
