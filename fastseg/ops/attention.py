"""DANet's position attention (PAM) and channel attention (CAM), fused."""

from __future__ import annotations

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference

__all__ = ["channel_attention", "position_attention"]


def _check_4d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} differs from {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_epilogue(gamma: Tensor | None, residual: Tensor | None, out_shape: torch.Size, ref: Tensor) -> None:
    if gamma is not None:
        if not isinstance(gamma, Tensor) or gamma.numel() != 1 or not gamma.is_floating_point():
            shape = tuple(gamma.shape) if isinstance(gamma, Tensor) else type(gamma).__name__
            raise ValueError(f"gamma must be a 1-element floating tensor, got {shape}")
        if gamma.device != ref.device:
            raise ValueError(f"gamma is on {gamma.device} but the inputs are on {ref.device}")
    if residual is not None:
        if not isinstance(residual, Tensor) or residual.shape != out_shape:
            shape = tuple(residual.shape) if isinstance(residual, Tensor) else type(residual).__name__
            raise ValueError(f"residual must have the output's shape {tuple(out_shape)}, got {shape}")
        if residual.device != ref.device:
            raise ValueError(f"residual is on {residual.device} but the inputs are on {ref.device}")


def position_attention(q: Tensor, k: Tensor, v: Tensor, *, gamma: Tensor | None = None,
                       residual: Tensor | None = None, backend: str | None = None) -> Tensor:
    """DANet position attention without the N×N matrix (N = H·W) in the fused backends.

    energy = qᵀk (no 1/√d scaling), A = softmax over keys, out = v·Aᵀ; the result is
    ``gamma * out + residual`` (each optional).

    Args:
        q, k: [B, Ck, H, W] queries and keys.
        v: [B, C, H, W] values (C may differ from Ck).
        gamma: optional 1-element scale (DANet's learnable γ).
        residual: optional [B, C, H, W] added at the end (DANet adds the block's input).
        backend: ``"reference" | "cpu" | "triton"`` or None for the fastest usable one.

    Returns:
        [B, C, H, W].

    Example::

        >>> q, k, v = torch.randn(2, 8, 17, 19), torch.randn(2, 8, 17, 19), torch.randn(2, 64, 17, 19)
        >>> position_attention(q, k, v, gamma=torch.tensor([0.5]), residual=v).shape
        torch.Size([2, 64, 17, 19])
    """
    q, k, v, residual = _backend.autocast_inputs(q, k, v, residual)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_4d(name, t)
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[0] != q.shape[0]:
        raise ValueError(f"v has batch {v.shape[0]} but q has batch {q.shape[0]}")
    if v.shape[2:] != q.shape[2:]:
        raise ValueError(f"spatial mismatch: q is {tuple(q.shape[2:])} but v is {tuple(v.shape[2:])}")
    _check_epilogue(gamma, residual, v.shape, v)
    out = _backend.resolve("position_attention", v.device, backend)(q, k, v)
    return _reference.gamma_residual(out, gamma, residual)


def channel_attention(x: Tensor, *, gamma: Tensor | None = None, residual: Tensor | None = None,
                      backend: str | None = None) -> Tensor:
    """DANet channel attention: E = X·Xᵀ (C×C), A = softmax(rowmax(E) − E), out = A·X; the
    result is ``gamma * out + residual`` (each optional).

    Args:
        x: [B, C, H, W].
        gamma: optional 1-element scale (DANet's learnable β).
        residual: optional [B, C, H, W] added at the end.
        backend: ``"reference" | "cpu" | "triton"`` or None for the fastest usable one.

    Example::

        >>> x = torch.randn(2, 64, 17, 19)
        >>> channel_attention(x, gamma=torch.tensor([0.5]), residual=x).shape
        torch.Size([2, 64, 17, 19])
    """
    x, residual = _backend.autocast_inputs(x, residual)
    _check_4d("x", x)
    _check_epilogue(gamma, residual, x.shape, x)
    out = _backend.resolve("channel_attention", x.device, backend)(x)
    return _reference.gamma_residual(out, gamma, residual)


def _triton_pam(q, k, v):
    from fastseg.triton_kernels import position_attention as tk

    return tk.position_attention(q, k, v)[0]


def _triton_cam(x):
    from fastseg.triton_kernels import channel_attention as tk

    return tk.channel_attention(x)


_backend.register("position_attention", "reference", _reference.position_attention)
_backend.register("position_attention", "cpu", lambda q, k, v: torch.ops.fastseg.position_attention(q, k, v)[0])
_backend.register("position_attention", "triton", _triton_pam)
_backend.register("channel_attention", "reference", _reference.channel_attention)
_backend.register("channel_attention", "cpu", lambda x: torch.ops.fastseg.channel_attention(x))
_backend.register("channel_attention", "triton", _triton_cam)
# No CUDA C++ kernel: on GPUs the Triton flash-style kernels serve (the order is provisional until
# a GPU run of bench/gpu_check.sh is recorded). CPU order: see bench/results/.
for _op in ("position_attention", "channel_attention"):
    _backend.set_preference(_op, {"cpu": ("cpu", "reference"), "cuda": ("triton", "reference")})
