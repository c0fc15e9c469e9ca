"""DANet's attention modules on top of the fused ops."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastseg.ops import channel_attention, position_attention

__all__ = ["ChannelAttention", "DANetHead", "PositionAttention"]


class PositionAttention(nn.Module):
    """DANet position attention module (PAM): 1×1 convs give queries and keys of in_ch/reduction
    channels and values of in_ch channels; out = γ·attention(q, k, v) + x with γ initialised to 0.

    Shape: [B, in_ch, H, W] → [B, in_ch, H, W]. The fused backends never build the N×N map.

    Example::

        >>> pam = PositionAttention(64)
        >>> pam(torch.randn(2, 64, 17, 19)).shape
        torch.Size([2, 64, 17, 19])
    """

    def __init__(self, in_ch: int, reduction: int = 8) -> None:
        super().__init__()
        key_ch = max(in_ch // reduction, 1)
        self.query_conv = nn.Conv2d(in_ch, key_ch, 1)
        self.key_conv = nn.Conv2d(in_ch, key_ch, 1)
        self.value_conv = nn.Conv2d(in_ch, in_ch, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return position_attention(self.query_conv(x), self.key_conv(x), self.value_conv(x),
                                  gamma=self.gamma, residual=x)


class ChannelAttention(nn.Module):
    """DANet channel attention module (CAM): out = β·attention(x) + x with β initialised to 0.

    Example::

        >>> ChannelAttention()(torch.randn(2, 64, 17, 19)).shape
        torch.Size([2, 64, 17, 19])
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return channel_attention(x, gamma=self.gamma, residual=x)


def _conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


def _classifier(in_ch: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(in_ch, num_classes, 1))


class DANetHead(nn.Module):
    """DANet's dual attention head: inter = in_ch/4 channels; a 3×3 conv-BN-ReLU before and after
    each attention module; the two branches are summed.

    Returns ``(fused, position, channel)`` logits, each [B, num_classes, H, W]: the sum branch and
    the two auxiliary outputs the paper supervises too.

    Example::

        >>> head = DANetHead(256, 19).eval()
        >>> [o.shape[1] for o in head(torch.randn(1, 256, 33, 33))]
        [19, 19, 19]
    """

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        inter = in_ch // 4
        self.conv5a = _conv_bn_relu(in_ch, inter)
        self.conv5c = _conv_bn_relu(in_ch, inter)
        self.sa = PositionAttention(inter)
        self.sc = ChannelAttention()
        self.conv51 = _conv_bn_relu(inter, inter)
        self.conv52 = _conv_bn_relu(inter, inter)
        self.conv6 = _classifier(inter, num_classes)
        self.conv7 = _classifier(inter, num_classes)
        self.conv8 = _classifier(inter, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sa_feat = self.conv51(self.sa(self.conv5a(x)))
        sc_feat = self.conv52(self.sc(self.conv5c(x)))
        return self.conv8(sa_feat + sc_feat), self.conv6(sa_feat), self.conv7(sc_feat)
