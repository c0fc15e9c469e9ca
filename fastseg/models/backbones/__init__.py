"""Backbones returning intermediate features by name: dilated ResNet-50/101 (torchvision's ResNet,
torchvision checkpoints load as is), DeepLab's Modified Aligned Xception-65 and VGG-16 (FCN).

Each backbone's ``forward(x)`` returns ``{name: tensor}`` for the names in its ``out_features``;
``backbone.channels[name]`` and ``backbone.strides[name]`` describe every name it can return.

Example::

    >>> from fastseg.models.backbones import build_backbone
    >>> net = build_backbone("resnet50", output_stride=8, out_features=("layer4",))
    >>> net(torch.randn(1, 3, 65, 65))["layer4"].shape
    torch.Size([1, 2048, 9, 9])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastseg.models.backbones.resnet import DilatedResNet, load_backbone_weights, resnet50, resnet101
from fastseg.models.backbones.vgg import VGG16, read_vgg16_checkpoint, vgg16
from fastseg.models.backbones.xception import AlignedXception, XceptionModule, xception65

__all__ = [
    "AlignedXception",
    "DilatedResNet",
    "VGG16",
    "XceptionModule",
    "build_backbone",
    "load_backbone_weights",
    "read_vgg16_checkpoint",
    "resnet101",
    "resnet50",
    "vgg16",
    "xception65",
]

_BACKBONES = {"resnet50": resnet50, "resnet101": resnet101, "vgg16": vgg16, "xception65": xception65}


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Backbone ``name`` (``resnet50``, ``resnet101``, ``xception65``, ``vgg16``) built with ``kwargs``
    (each backbone's own keyword arguments; VGG-16 takes no ``output_stride``)."""
    if name not in _BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(_BACKBONES)}, got {name!r}")
    return _BACKBONES[name](**kwargs)
