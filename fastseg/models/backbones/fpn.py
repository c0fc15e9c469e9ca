"""ResNet + FPN (torchvision's ResNet builders and ``torchvision.ops.FeaturePyramidNetwork``): P2–P5 from
``layer1``–``layer4`` plus P6 by max-pooling P5 (stride 2, kernel 1: torchvision's ``LastLevelMaxPool`` and
mmdet's FPN without extra convs), all ``out_channels`` wide.

Example::

    >>> net = ResNetFPN("resnet18", out_channels=64)
    >>> [tuple(f.shape) for f in net(torch.randn(1, 3, 64, 96))]
    [(1, 64, 16, 24), (1, 64, 8, 12), (1, 64, 4, 6), (1, 64, 2, 3), (1, 64, 1, 2)]
"""

from __future__ import annotations

import os

from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fastseg.models.backbones.resnet import load_backbone_weights

__all__ = ["FPN_STRIDES", "RESNETS", "ResNetFPN"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6
_STAGES = ("layer1", "layer2", "layer3", "layer4")


class ResNetFPN(nn.Module):
    """torchvision ResNet-18/34/50/101 (``weights=None``; no classifier) with an FPN on its four stages.

    Args:
        name: one of :data:`RESNETS`.
        out_channels: FPN width (256 in SOLO).
        weights: path of a local torchvision-format ResNet checkpoint for the ResNet (``fc.*`` ignored).

    Shape: [N, 3, H, W] → [P2, P3, P4, P5, P6], Pk: [N, out_channels, ⌈H/2^k⌉-ish] (exactly H/2^k when H and W
    are multiples of 64).
    """

    def __init__(self, name: str = "resnet50", out_channels: int = 256,
                 weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
        body = getattr(tv_resnet, name)(weights=None)
        del body.fc, body.avgpool  # parameter names stay torchvision's, minus the classifier
        if weights is not None:
            load_backbone_weights(body, weights, ignore=("fc.",))
        self.body = body
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        in_channels = [64 * 2**i * expansion for i in range(4)]
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        feats = {}
        for name in _STAGES:
            x = getattr(b, name)(x)
            feats[name] = x
        return list(self.fpn(feats).values())
