"""Convolution modules built on fastseg's fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastseg.ops import separable_conv2d
from fastseg.ops._reference import fixed_padding

__all__ = ["SeparableConv2d"]


def _fold(bn: nn.BatchNorm2d, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A BatchNorm in eval mode, applied after a conv with ``bias``, as a per-channel (scale, shift)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    mean = bn.running_mean if bias is None else bn.running_mean - bias
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class SeparableConv2d(nn.Module):
    """DeepLabv3+ atrous separable convolution: depthwise k×k (dilated) → BN → ReLU → pointwise
    1×1 → BN → ReLU, with DeepLab's fixed "same" padding.

    What is fused:
      * eval mode (BatchNorms use running statistics): both BatchNorms are folded into per-channel
        affines and the whole block is one ``fastseg.ops.separable_conv2d`` call; the depthwise
        intermediate is never materialised.
      * ``bn=False``: fused in train and eval (the pointwise bias becomes the final shift).
      * train mode with BatchNorm: each BatchNorm needs the batch statistics of its input, so the
        block runs unfused (PyTorch conv → batch_norm → relu → conv → batch_norm → relu); results
        and running-stat updates are exactly those of the eager module.

    Args:
        in_ch, out_ch: channels.
        kernel_size, stride, dilation: of the depthwise conv.
        bn: BatchNorm after each conv (else a bias on the pointwise conv).
        relu_after_depthwise: ReLU between the two convs.
        relu: ReLU at the end.

    Shape: [N, in_ch, H, W] → [N, out_ch, Ho, Wo] (Ho = H for stride 1).

    Example::

        >>> block = SeparableConv2d(256, 256, dilation=12).eval()
        >>> block(torch.randn(1, 256, 33, 33)).shape
        torch.Size([1, 256, 33, 33])
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1,
                 bn: bool = True, relu_after_depthwise: bool = True, relu: bool = True) -> None:
        super().__init__()
        self.stride, self.dilation = stride, dilation
        self.relu_after_depthwise, self.relu = relu_after_depthwise, relu
        self.depthwise = nn.Conv2d(in_ch, in_ch, kernel_size, stride, 0, dilation, groups=in_ch, bias=False)
        self.bn_depth = nn.BatchNorm2d(in_ch) if bn else None
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=not bn)
        self.bn_point = nn.BatchNorm2d(out_ch) if bn else None

    def _fusable(self) -> bool:
        return all(bn is None or (not bn.training and bn.track_running_stats)
                   for bn in (self.bn_depth, self.bn_point))

    def forward(self, x: Tensor) -> Tensor:
        if self._fusable():
            # conv biases (present on modules swapped in by fastseg.nn.fuse_modules) fold into the shifts
            dw_scale = pw_scale = None
            dw_shift, pw_shift = self.depthwise.bias, self.pointwise.bias
            if self.bn_depth is not None:
                dw_scale, dw_shift = _fold(self.bn_depth, dw_shift)
            if self.bn_point is not None:
                pw_scale, pw_shift = _fold(self.bn_point, pw_shift)
            return separable_conv2d(
                x, self.depthwise.weight, self.pointwise.weight, stride=self.stride, padding="same",
                dilation=self.dilation, dw_scale=dw_scale, dw_shift=dw_shift, dw_relu=self.relu_after_depthwise,
                pw_scale=pw_scale, pw_shift=pw_shift, relu=self.relu)
        beg, end = fixed_padding(self.depthwise.kernel_size[0], self.dilation, "same")
        y = self.depthwise(F.pad(x, (beg, end, beg, end)))
        y = self.bn_depth(y) if self.bn_depth is not None else y
        y = F.relu(y) if self.relu_after_depthwise else y
        z = self.pointwise(y)
        z = self.bn_point(z) if self.bn_point is not None else z
        return F.relu(z) if self.relu else z

    def extra_repr(self) -> str:
        return (f"{self.depthwise.in_channels}, {self.pointwise.out_channels}, "
                f"kernel_size={self.depthwise.kernel_size[0]}, stride={self.stride}, dilation={self.dilation}, "
                f"bn={self.bn_depth is not None}, relu_after_depthwise={self.relu_after_depthwise}, relu={self.relu}")
