"""Loads the compiled extension ``fastseg._C`` and reports what it was built for.

``has_ops()`` is True once the C++/CUDA operators are registered. When the shared library fails
to load, ``load_error()`` explains why, naming a torch mismatch when there is one, so that callers
never see a bare "operator fastseg::... does not exist".
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["has_ops", "has_cuda_ops", "load_error", "build_info"]

_LOADED = False
_ERROR: str | None = None
_BUILD: dict[str, Any] = {}


def _running_torch() -> str:
    return torch.__version__.split("+")[0]


def _load() -> None:
    global _LOADED, _ERROR, _BUILD
    try:
        from fastseg._build_info import BUILD_INFO

        _BUILD = dict(BUILD_INFO)
    except ImportError:
        _ERROR = "fastseg was not built: run `pip install --no-build-isolation -e .` (or `make build`)"
        return
    built_for = _BUILD.get("torch")
    try:
        importlib.import_module("fastseg._C")
    except (ImportError, OSError) as e:
        hint = ""
        if built_for and built_for != _running_torch():
            hint = f"fastseg._C was built for torch {built_for} but torch {_running_torch()} is running; "
        _ERROR = f"{hint}fastseg._C failed to load ({e}); rebuild with `pip install --no-build-isolation -e .`"
        return
    compiled = str(torch.ops.fastseg._build_info())
    if built_for and f"torch={built_for};" not in compiled:
        _ERROR = f"fastseg._C reports '{compiled}' but fastseg/_build_info.py says torch {built_for}; rebuild"
        return
    if built_for != _running_torch():
        _ERROR = (
            f"fastseg._C was built for torch {built_for} but torch {_running_torch()} is running; "
            "rebuild with `pip install --no-build-isolation -e .`"
        )
        return
    _LOADED = True


_load()


def has_ops() -> bool:
    """True when the compiled C++ (and, if built, CUDA) operators are registered."""
    return _LOADED


def has_cuda_ops() -> bool:
    """True when the CUDA kernels were compiled into fastseg._C."""
    return _LOADED and "cuda" in _BUILD.get("compiled_backends", [])


def load_error() -> str | None:
    """Why the compiled operators are unavailable, or None when they loaded."""
    return _ERROR


def build_info() -> dict[str, Any]:
    """What fastseg._C was built for: version, torch, CUDA version, archs, compiled backends."""
    return dict(_BUILD)
