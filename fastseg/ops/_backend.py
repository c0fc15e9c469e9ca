"""Backend registry and selection.

Every op has implementations keyed by backend name (``reference``, ``cpu``, ``cuda``, ``triton``)
and a preference order per device type: the order the benchmarks measured (see each op module).
Selection precedence: the op's ``backend=`` argument, then ``use_backend(...)``, then the
``FASTSEG_BACKEND`` environment variable, then the fastest usable backend. A backend that was
asked for but cannot run raises ``BackendUnavailableError`` saying why; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from fastseg import _extension

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "autocast_inputs",
    "available_backends",
    "backend_status",
    "register",
    "resolve",
    "use_backend",
]

BACKENDS = ("reference", "cpu", "cuda", "triton")


def autocast_inputs(*tensors):
    """The op's floating tensors in the one dtype it runs in under autocast (None entries and other
    tensors unchanged; no-op when autocast is off for the first tensor's device): on GPUs the autocast
    dtype, like a conv or matmul; on CPU float32, since the C++ kernels have no bf16/fp16 path (autocast's
    "run in fp32" class of ops). Cast in the public function so that every backend sees consistent dtypes."""
    x = tensors[0]
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and torch.is_autocast_enabled(x.device.type)):
        return tensors
    dtype = torch.float32 if x.device.type == "cpu" else torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


class BackendUnavailableError(RuntimeError):
    """A backend was requested that cannot run here; the message says why."""


_IMPLS: dict[str, dict[str, Callable]] = {}
# (op, "cpu"/"cuda") -> (the compiled op it calls, whether the loaded fastseg._C has that kernel)
_KERNELS: dict[tuple[str, str], tuple[str, bool]] = {}
_PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {}
# use_backend() stack; a plain list so that torch.compile can read it without a graph break.
_OVERRIDE: list[str] = []


def register(op: str, backend: str, fn: Callable, kernel: str | None = None) -> None:
    """Register ``fn`` as ``op``'s implementation for ``backend``; ``kernel`` names the compiled op
    (``"fastseg::x"``) a cpu/cuda implementation calls, so that a build without it reports why."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn
    if kernel is not None:  # asked once here: torch.compile cannot trace the dispatcher query
        _KERNELS[(op, backend)] = (kernel, _kernel_present(kernel, backend))


def _kernel_present(qualname: str, backend: str) -> bool:
    if not _extension.has_ops():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, backend.upper())
    except RuntimeError:  # the op itself does not exist
        return False


def set_preference(op: str, order: dict[str, Sequence[str]]) -> None:
    """Preference order of ``op``'s backends per device type ({"cpu": [...], "cuda": [...]})."""
    _PREFERENCE[op] = {dev: tuple(names) for dev, names in order.items()}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_FOUND: list[bool] = []


def _triton_found() -> bool:
    if not _TRITON_FOUND:
        _TRITON_FOUND.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_FOUND[0]


def _reason(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``, or None when it can."""
    if backend not in _IMPLS.get(op, {}):
        return f"{op} has no {backend} implementation"
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if not _extension.has_ops():
            return str(_extension.load_error())
        if backend == "cuda":
            if not _extension.has_cuda_ops():
                skipped = _extension.build_info().get("cuda_skipped") or "unknown reason"
                return f"fastseg._C was built without CUDA kernels ({skipped})"
            if not torch.cuda.is_available():
                return "no CUDA GPU is visible"
        kernel, present = _KERNELS.get((op, backend), ("", True))
        if not present:
            return f"fastseg._C has no {backend.upper()} kernel for {kernel} (built from older sources?)"
        where = f"the {backend} backend takes {backend.upper()} tensors, got {device}"
        return None if device.type == backend else where
    # triton
    if not _triton_found():
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"


def _order(op: str, device_type: str) -> tuple[str, ...]:
    order = _PREFERENCE.get(op, {}).get(device_type, ())
    # The interpreter is a correctness tool, never the fastest: Triton on CPU goes last.
    return order + tuple(b for b in BACKENDS if b not in order and b in _IMPLS.get(op, {}))


def resolve(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of ``op`` to run on ``device``, honouring the selection precedence."""
    name = backend or (_OVERRIDE[-1] if _OVERRIDE else None) or os.environ.get("FASTSEG_BACKEND") or None
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
        why = _reason(op, name, device)
        if why is not None:
            raise BackendUnavailableError(f"{op}: backend '{name}' cannot run: {why}")
        return _IMPLS[op][name]
    for candidate in _order(op, device.type):
        if _reason(op, candidate, device) is None:
            return _IMPLS[op][candidate]
    raise BackendUnavailableError(f"{op}: no backend can run on {device}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(device: torch.device | str | None = None) -> dict[str, list[str]]:
    """``{op: [backend, ...]}``: the backends usable right now on ``device`` (default: the GPU if
    there is one, else the CPU), fastest first."""
    dev = torch.device(device) if device is not None else _default_device()
    return {op: [b for b in _order(op, dev.type) if _reason(op, b, dev) is None] for op in sorted(_IMPLS)}


def backend_status(device: torch.device | str | None = None) -> dict[str, dict[str, str]]:
    """``{op: {backend: "ok" or why it is missing}}`` for every backend of every op on ``device``."""
    dev = torch.device(device) if device is not None else _default_device()
    return {
        op: {b: (_reason(op, b, dev) or "ok") for b in BACKENDS}
        for op in sorted(_IMPLS)
    }


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every fastseg op inside the block on backend ``name`` (None restores automatic choice).

    Example::

        with fastseg.ops.use_backend("reference"):
            y = model(x)   # same weights, unfused PyTorch
    """
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    _OVERRIDE.append(name or "")
    try:
        yield
    finally:
        _OVERRIDE.pop()
