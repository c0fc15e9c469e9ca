"""Backend selection: available_backends, backend_status, use_backend, FASTSEG_BACKEND, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU

from fastseg import _extension, ops
from fastseg.ops import _backend


def _inputs():
    return torch.randn(1, 3, 7, 7), torch.randn(3, 1, 3, 3), torch.randn(4, 3, 1, 1)


def _spy(monkeypatch):
    """Record which backend each call of separable_conv2d ran on."""
    calls = []
    impls = _backend._IMPLS["separable_conv2d"]
    for name, fn in list(impls.items()):
        def wrapped(*a, _name=name, _fn=fn):
            calls.append(_name)
            return _fn(*a)
        monkeypatch.setitem(impls, name, wrapped)
    return calls


def test_available_backends_on_cpu_lists_fastest_first():
    avail = ops.available_backends("cpu")
    assert avail["separable_conv2d"][0] == "cpu"
    assert "reference" in avail["separable_conv2d"]
    assert set(ops.backend_status("cpu")["separable_conv2d"]) == set(ops.BACKENDS)


def test_default_picks_the_fused_cpu_kernel(monkeypatch):
    calls = _spy(monkeypatch)
    ops.separable_conv2d(*_inputs())
    assert calls == ["cpu"]


def test_use_backend_and_env_and_argument_precedence(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setenv("FASTSEG_BACKEND", "reference")
    ops.separable_conv2d(*_inputs())
    with ops.use_backend("cpu"):
        ops.separable_conv2d(*_inputs())
        ops.separable_conv2d(*_inputs(), backend="reference")
    ops.separable_conv2d(*_inputs())
    assert calls == ["reference", "cpu", "reference", "reference"]


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.separable_conv2d(*_inputs(), backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("fast"):
            pass


@pytest.mark.skipif(HAS_GPU, reason="checks the reasons given when no GPU is present")
def test_unusable_backends_say_why_and_never_fall_back(monkeypatch):
    status = ops.backend_status("cpu")["separable_conv2d"]
    assert status["cpu"] == "ok" and status["reference"] == "ok"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ops.BackendUnavailableError, match="Triton runs on CUDA tensors"):
        ops.separable_conv2d(*_inputs(), backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.separable_conv2d(*_inputs(), backend="cuda")


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_extension, "_LOADED", False)
    monkeypatch.setattr(_extension, "_ERROR", "fastseg._C was built for torch 1.0 but torch 9.9 is running")
    why = ops.backend_status("cpu")["separable_conv2d"]["cpu"]
    assert "built for torch 1.0" in why
    assert ops.available_backends("cpu")["separable_conv2d"] == ["reference"]
    with pytest.raises(ops.BackendUnavailableError, match="built for torch 1.0"):
        ops.separable_conv2d(*_inputs(), backend="cpu")
