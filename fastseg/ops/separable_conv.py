"""Fused atrous separable convolution (DeepLabv3+ / Xception)."""

from __future__ import annotations

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference
from fastseg.ops._reference import fixed_padding

__all__ = ["separable_conv2d"]

OP = "separable_conv2d"


def _check(x: Tensor, dw_weight: Tensor, pw_weight: Tensor, stride: int, dilation: int,
           affines: dict[str, Tensor | None]) -> None:
    for name, t in (("x", x), ("dw_weight", dw_weight), ("pw_weight", pw_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got {x.dtype}")
    c = x.shape[1]
    if dw_weight.dim() != 4 or dw_weight.shape[0] != c or dw_weight.shape[1] != 1 \
            or dw_weight.shape[2] != dw_weight.shape[3] or dw_weight.shape[2] < 1:
        raise ValueError(f"dw_weight must be [C, 1, k, k] with C = x.shape[1] = {c}, got {tuple(dw_weight.shape)}")
    if pw_weight.dim() != 4 or pw_weight.shape[1] != c or pw_weight.shape[2:] != (1, 1):
        raise ValueError(f"pw_weight must be [O, C, 1, 1] with C = x.shape[1] = {c}, got {tuple(pw_weight.shape)}")
    for name, t in (("dw_weight", dw_weight), ("pw_weight", pw_weight)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    if not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be an int >= 1, got {dilation!r}")
    for name, t in affines.items():
        if t is None:
            continue
        n = c if name.startswith("dw") else pw_weight.shape[0]
        if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D floating tensor of length {n}, got {shape}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def separable_conv2d(
    x: Tensor,
    dw_weight: Tensor,
    pw_weight: Tensor,
    *,
    stride: int = 1,
    padding: str | int | tuple[int, int] = "same",
    dilation: int = 1,
    dw_scale: Tensor | None = None,
    dw_shift: Tensor | None = None,
    dw_relu: bool = False,
    pw_scale: Tensor | None = None,
    pw_shift: Tensor | None = None,
    relu: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Depthwise k×k (atrous) conv → affine (+ReLU) → pointwise 1×1 conv → affine (+ReLU), fused.

    Args:
        x: [N, C, H, W] input (any memory format).
        dw_weight: [C, 1, k, k] depthwise filters.
        pw_weight: [O, C, 1, 1] pointwise filters.
        stride, dilation: of the depthwise stage.
        padding: ``"same"`` (DeepLab's fixed_padding: k_eff = k + (k-1)(d-1), pad_beg =
            (k_eff-1)//2, pad_end = k_eff-1-pad_beg), ``"valid"``, an int, or (pad_beg, pad_end).
        dw_scale, dw_shift: optional [C] affine after the depthwise stage (a folded BatchNorm).
        dw_relu: ReLU after that affine.
        pw_scale, pw_shift: optional [O] affine after the pointwise stage.
        relu: ReLU at the end.
        backend: ``"reference" | "cpu" | "cuda" | "triton"`` or None for the fastest usable one.

    Returns:
        [N, O, Ho, Wo], contiguous, with Ho = (H + pad_beg + pad_end - k_eff) // stride + 1.

    Example::

        >>> x = torch.randn(2, 32, 33, 33)
        >>> dw, pw = torch.randn(32, 1, 3, 3), torch.randn(64, 32, 1, 1)
        >>> separable_conv2d(x, dw, pw, dilation=6, relu=True).shape
        torch.Size([2, 64, 33, 33])
    """
    affines = {"dw_scale": dw_scale, "dw_shift": dw_shift, "pw_scale": pw_scale, "pw_shift": pw_shift}
    # Under autocast the convolutions run in one dtype (the affines, fp32 BatchNorm folds, stay as they are).
    x, dw_weight, pw_weight = _backend.autocast_inputs(x, dw_weight, pw_weight)
    _check(x, dw_weight, pw_weight, stride, dilation, affines)
    pad_beg, pad_end = fixed_padding(dw_weight.shape[-1], dilation, padding)
    impl = _backend.resolve(OP, x.device, backend)
    return impl(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                stride, pad_beg, pad_end, dilation, bool(dw_relu), bool(relu))


def _reference_impl(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                    stride, pad_beg, pad_end, dilation, dw_relu, relu):
    return _reference.separable_conv2d(
        x, dw_weight, pw_weight, stride=stride, padding=(pad_beg, pad_end), dilation=dilation,
        dw_scale=dw_scale, dw_shift=dw_shift, dw_relu=dw_relu, pw_scale=pw_scale, pw_shift=pw_shift,
        relu=relu)


def _compiled_impl(x, *args):
    return torch.ops.fastseg.separable_conv2d(x, *args)


def _triton_impl(x, *args):
    from fastseg.triton_kernels import separable_conv2d as tk

    return tk.separable_conv2d(x, *args)


_backend.register(OP, "reference", _reference_impl)
_backend.register(OP, "cpu", _compiled_impl)
_backend.register(OP, "cuda", _compiled_impl)
_backend.register(OP, "triton", _triton_impl)
# Measured order (bench/results/): on CPU the fused C++ kernel beats the PyTorch composition.
# On CUDA the order is provisional until a GPU run of bench/gpu_check.sh is recorded.
_backend.set_preference(OP, {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
