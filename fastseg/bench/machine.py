"""The machine a run measures: versions, hardware, threads, what ``fastseg._C`` was built for, and on a
GPU the roofs measured once per run (device-to-device copy GB/s, dense matmul TFLOP/s per dtype)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch

from fastseg import _extension, ops
from fastseg.bench.cases import dtype_name
from fastseg.bench.timing import Timing, time_fn

__all__ = ["git_commit", "loadavg", "machine_info", "measure_ceilings"]


def _time_copy(nbytes: int, device: torch.device, budget_s: float) -> Timing:
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return time_fn(lambda: dst.copy_(src), device, budget_s)


def measure_ceilings(device: torch.device, dtypes: Sequence[torch.dtype], budget_s: float) -> dict[str, Any]:
    """GPU roofs measured once per run: device-to-device copy GB/s, and dense matmul TFLOP/s per dtype."""
    if device.type != "cuda":
        return {}
    out: dict[str, Any] = {}
    try:
        nbytes = 2 * 2**30
        t = _time_copy(nbytes, device, budget_s)
        out["copy_GBps"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9  # read + write
    except Exception as e:
        out["copy_error"] = f"{type(e).__name__}: {e}"
    out["matmul_TFLOPs"] = {}
    for dt in dtypes:
        try:
            n = 8192
            a = torch.randn(n, n, device=device, dtype=dt)
            b = torch.randn(n, n, device=device, dtype=dt)
            t = time_fn(lambda a=a, b=b: a @ b, device, budget_s)
            out["matmul_TFLOPs"][dtype_name(dt)] = 2 * n**3 / (t.median_ms * 1e-3) / 1e12
            del a, b
        except Exception as e:
            out["matmul_TFLOPs"][dtype_name(dt)] = f"{type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> str | None:
    """The commit of the source tree being measured, ``+dirty`` when tracked files differ from it; None
    outside a git checkout (an installed package)."""
    root = Path(__file__).resolve().parents[2]
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Versions, hardware, threads, and what fastseg._C was built for."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "build_info": _extension.build_info(),
        "extension_loaded": _extension.has_ops(),
        "extension_error": _extension.load_error(),
        "backend_status": ops.backend_status(device),
        "git_commit": git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "loadavg_at_start": loadavg(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({
            "device_name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "device_memory_GiB": round(p.total_memory / 2**30, 1),
            "sm_count": p.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    else:
        info["device_name"] = info["cpu"]
    return info
