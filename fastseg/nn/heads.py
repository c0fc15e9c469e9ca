"""Segmentation heads shared by several architectures: DeepLab's ASPP and ASPP-L, PSPNet's pyramid
pooling, the DeepLab v3+ decoder and the FCN-style auxiliary head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastseg.nn.conv import SeparableConv2d

__all__ = ["ASPP", "ASPPL", "AuxHead", "DeepLabV3PlusDecoder", "PyramidPooling"]


def _positive_ints(value: Sequence[int], name: str, allow_empty: bool = False) -> tuple[int, ...]:
    try:
        vals = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}") from None
    if (not vals and not allow_empty) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                 for v in vals):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    return vals


def _check_channels(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _PooledBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d for pooled maps. In train mode a batch with one value per channel (N·H·W == 1:
    batch size 1 after global pooling) has no variance to normalise by — PyTorch raises there,
    TensorFlow silently outputs the bias. This layer normalises such a batch with the running
    statistics (as DeepLab's TF training does for every BatchNorm when the batch is too small to
    fine-tune them) and leaves the statistics unchanged; any larger batch is ordinary BatchNorm.
    The state dict is BatchNorm2d's."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel_size - 1) // 2
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel_size, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLab v3 atrous spatial pyramid pooling.

    Branches, each ``out_channels`` wide with BatchNorm + ReLU: a 1×1 conv, one 3×3 conv per rate in
    ``atrous_rates`` (``separable=True``: :class:`SeparableConv2d`, DeepLab v3+'s atrous separable
    conv, BN + ReLU after the depthwise and the pointwise conv), and image pooling (global average →
    1×1 conv → BN → ReLU → broadcast back to H×W). The concatenation is projected by a 1×1 conv +
    BN + ReLU, followed by dropout ``dropout`` (0.1: DeepLab's TensorFlow code keeps 0.9 of the
    activations there; torchvision uses 0.5).

    The pooling branch sees one value per channel and sample, so in train mode with batch size 1 its
    BatchNorm has no batch variance (torchvision's ASPP raises there): such a batch is normalised
    with the running statistics, which it does not update; batches of two or more use ordinary
    batch statistics.

    Shape: [N, in_channels, H, W] → [N, out_channels, H, W].

    Example::

        >>> aspp = ASPP(2048, 256, atrous_rates=(6, 12, 18)).train()
        >>> aspp(torch.randn(1, 2048, 33, 33)).shape   # batch size 1 in train mode works
        torch.Size([1, 256, 33, 33])
    """

    def __init__(self, in_channels: int, out_channels: int = 256, atrous_rates: Sequence[int] = (6, 12, 18),
                 separable: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        _check_channels(in_channels, "in_channels")
        _check_channels(out_channels, "out_channels")
        rates = _positive_ints(atrous_rates, "atrous_rates")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.atrous_rates, self.separable = rates, separable
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, out_channels, 1)]
        for r in rates:
            branches.append(SeparableConv2d(in_channels, out_channels, 3, dilation=r) if separable
                            else _conv_bn_relu(in_channels, out_channels, 3, r))
        self.branches = nn.ModuleList(branches)
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     _PooledBatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(rates) + 2), out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        # bilinear upsampling of a 1×1 map is a broadcast; expand is exact and free
        outs.append(self.pooling(x).expand(-1, -1, x.shape[2], x.shape[3]))
        return self.project(torch.cat(outs, dim=1))


class ASPPL(nn.Module):
    """DeepLab v2 ASPP-L: four parallel 3×3 convs with rates (6, 12, 18, 24) straight to class
    scores, summed. Convs have biases and start from N(0, 0.01²) weights, as in DeepLab v2's Caffe
    models.

    Shape: [N, in_channels, H, W] → [N, num_classes, H, W].

    Example::

        >>> ASPPL(2048, 21)(torch.randn(1, 2048, 9, 9)).shape
        torch.Size([1, 21, 9, 9])
    """

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        _check_channels(in_channels, "in_channels")
        _check_channels(num_classes, "num_classes")
        self.atrous_rates = _positive_ints(atrous_rates, "atrous_rates")
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r)
                                      for r in self.atrous_rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: for each bin size b, adaptive average pooling to b×b, a 1×1
    conv to ``reduction_channels`` (default in_channels / len(bins), i.e. C/4 for four bins) + BN +
    ReLU, bilinear upsampling back to H×W (``align_corners=True`` as PSPNet's Caffe interpolation
    layer); the results are concatenated with the input. The 1×1 bin's BatchNorm handles batch size 1
    in train mode as :class:`ASPP`'s pooling branch does.

    Shape: [N, C, H, W] → [N, C + len(bins)·reduction_channels, H, W] (``out_channels``).

    Example::

        >>> ppm = PyramidPooling(2048, bins=(1, 2, 3, 6))
        >>> ppm(torch.randn(2, 2048, 9, 9)).shape
        torch.Size([2, 4096, 9, 9])
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6), reduction_channels: int | None = None,
                 align_corners: bool = True) -> None:
        super().__init__()
        _check_channels(in_channels, "in_channels")
        self.bins = _positive_ints(bins, "bins")
        red = in_channels // len(self.bins) if reduction_channels is None else reduction_channels
        _check_channels(red, "reduction_channels")
        self.align_corners = align_corners
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, red, 1, bias=False), _PooledBatchNorm2d(red),
                          nn.ReLU(inplace=True))
            for b in self.bins)
        self.out_channels = in_channels + len(self.bins) * red

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        outs = [x]
        for stage in self.stages:
            y = stage(x)
            if y.shape[2] == 1 and y.shape[3] == 1:
                outs.append(y.expand(-1, -1, size[0], size[1]))
            else:
                outs.append(F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners))
        return torch.cat(outs, dim=1)


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLab v3+ decoder: low-level features → 1×1 conv to ``low_level_reduced`` (48) + BN + ReLU;
    the encoder output (ASPP, stride 16 or 8) is upsampled bilinearly to the low-level size (×4 at
    output stride 16; ``align_corners=True`` as DeepLab's TF code, exact for sizes s·k + 1), the two
    are concatenated, refined by two 3×3 :class:`SeparableConv2d` of ``channels`` (256), and
    classified by a 1×1 conv. Logits come out at the low-level resolution (stride 4).

    Shape: encoder [N, encoder_channels, h, w], low_level [N, low_level_channels, H4, W4] →
    [N, num_classes, H4, W4].

    Example::

        >>> dec = DeepLabV3PlusDecoder(low_level_channels=256, num_classes=21)
        >>> dec(torch.randn(1, 256, 9, 9), torch.randn(1, 256, 33, 33)).shape
        torch.Size([1, 21, 33, 33])
    """

    def __init__(self, low_level_channels: int, num_classes: int, encoder_channels: int = 256,
                 low_level_reduced: int = 48, channels: int = 256, align_corners: bool = True) -> None:
        super().__init__()
        for value, name in ((low_level_channels, "low_level_channels"), (num_classes, "num_classes"),
                            (encoder_channels, "encoder_channels"), (low_level_reduced, "low_level_reduced"),
                            (channels, "channels")):
            _check_channels(value, name)
        self.align_corners = align_corners
        self.reduce = _conv_bn_relu(low_level_channels, low_level_reduced, 1)
        self.fuse = nn.Sequential(SeparableConv2d(encoder_channels + low_level_reduced, channels, 3),
                                  SeparableConv2d(channels, channels, 3))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        x = F.interpolate(x, size=low_level.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return self.classifier(self.fuse(torch.cat([x, self.reduce(low_level)], dim=1)))


class AuxHead(nn.Module):
    """FCN-style auxiliary classifier (PSPNet's deep supervision on ResNet ``layer3``; torchvision's
    ``FCNHead``): 3×3 conv to ``channels`` (256) + BN + ReLU + Dropout2d(``dropout``) + 1×1 conv.

    Shape: [N, in_channels, H, W] → [N, num_classes, H, W].

    Example::

        >>> AuxHead(1024, 21)(torch.randn(2, 1024, 9, 9)).shape
        torch.Size([2, 21, 9, 9])
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        _check_channels(in_channels, "in_channels")
        _check_channels(channels, "channels")
        self.block = _conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, _check_channels(num_classes, "num_classes"), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))
