"""Pure-PyTorch reference of every fastseg op: the oracle of the tests and the ``reference``
backend. Written for clarity, not speed; every function runs on any device and dtype."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv_out_size", "fixed_padding", "separable_conv2d"]


def fixed_padding(kernel_size: int, dilation: int, padding: str | int | tuple[int, int]) -> tuple[int, int]:
    """(pad_beg, pad_end) of each spatial side.

    ``"same"`` is DeepLab's fixed_padding: k_eff = k + (k-1)(d-1), pad_beg = (k_eff-1)//2,
    pad_end = k_eff-1-pad_beg (so stride 1 keeps the size); ``"valid"`` is no padding; an int
    pads both sides equally; a pair is (pad_beg, pad_end).
    """
    if isinstance(padding, str):
        if padding == "same":
            k_eff = kernel_size + (kernel_size - 1) * (dilation - 1)
            beg = (k_eff - 1) // 2
            return beg, k_eff - 1 - beg
        if padding == "valid":
            return 0, 0
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        beg = end = padding
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        beg, end = padding
    else:
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    if beg < 0 or end < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return beg, end


def conv_out_size(n: int, pad_beg: int, pad_end: int, k: int, dilation: int, stride: int) -> int:
    """Output length of a k-tap, dilated, strided convolution over n inputs padded (beg, end)."""
    span = n + pad_beg + pad_end - ((k - 1) * dilation + 1)
    return 0 if span < 0 else span // stride + 1


def _affine_act(v: Tensor, scale: Tensor | None, shift: Tensor | None, relu: bool) -> Tensor:
    if scale is not None:
        v = v * scale.view(1, -1, 1, 1)
    if shift is not None:
        v = v + shift.view(1, -1, 1, 1)
    return F.relu(v) if relu else v


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
) -> Tensor:
    """Depthwise k×k (dilated) conv → affine (+ReLU) → pointwise 1×1 conv → affine (+ReLU)."""
    k = dw_weight.shape[-1]
    beg, end = fixed_padding(k, dilation, padding)
    x = F.pad(x, (beg, end, beg, end))
    if x.shape[-2] < (k - 1) * dilation + 1 or x.shape[-1] < (k - 1) * dilation + 1:
        # The kernel does not fit: an empty output, as the fused kernels return.
        ho = conv_out_size(x.shape[-2], 0, 0, k, dilation, stride)
        wo = conv_out_size(x.shape[-1], 0, 0, k, dilation, stride)
        return x.new_zeros(x.shape[0], pw_weight.shape[0], ho, wo) + 0 * pw_weight.sum() + 0 * x.sum()
    y = F.conv2d(x, dw_weight, stride=stride, dilation=dilation, groups=x.shape[1])
    y = _affine_act(y, dw_scale, dw_shift, dw_relu)
    z = F.conv2d(y, pw_weight)
    return _affine_act(z, pw_scale, pw_shift, relu)
