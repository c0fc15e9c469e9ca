"""DANet (Fu et al., CVPR 2019, "Dual Attention Network for Scene Segmentation") on fastseg's layers.

Dilated ResNet at output stride 8 → :class:`fastseg.nn.DANetHead` on ``layer4`` (2048 channels): two
branches of 3×3 conv 512 + BN + ReLU, the position attention module (PAM, fused
``position_attention``: never the N×N map) on one and the channel attention module (CAM) on the
other, another 3×3 conv 512 + BN + ReLU each, summed; three 1×1 classifiers (after Dropout2d(0.1)):
the sum (``"out"``) and each branch alone (``"pam"``, ``"cam"``), which training supervises too with
equal weights (:func:`fastseg.losses.danet_loss`).

As the authors' code (junfu1115/DANet, Cityscapes recipe ``--multi-grid --multi-dilation 4 8 16``),
the three blocks of ``layer4`` use dilations 4, 8 and 16 (``multi_grid=(1, 2, 4)`` times the stage's
rate 4). The ResNet is torchvision's (7×7 stem; the authors' has a three-conv deep stem) so that
torchvision checkpoints load. Logits are upsampled bilinearly with ``align_corners=True`` (the
authors' ``up_kwargs``); inputs are padded to 8k + 1 sizes and the logits cropped back, as in
:mod:`fastseg.models.deeplab`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor, nn

from fastseg.models.backbones import build_backbone
from fastseg.models.deeplab import (
    _RESNETS,
    _check_aux,
    _check_input,
    _check_int,
    _pad_to_grid,
    _resize_crop,
    _validate_common,
)
from fastseg.nn import DANetHead

__all__ = ["DANet", "danet"]


class DANet(nn.Module):
    """DANet: dilated ResNet (layer4 dilations 4, 8, 16), dual attention head, three classifiers.

    ``aux_loss``: None (default) returns ``"pam"`` and ``"cam"`` (the branch classifiers) in train
    mode only, as the paper supervises them; True returns them in eval too; False never (the branch
    classifiers stay, so checkpoints load either way).

    Shape: [N, in_channels, H, W] → ``{"out": [N, K, H, W]}`` (+ ``"pam"``, ``"cam"`` [N, K, H, W]),
    any H, W.

    Example::

        >>> model = DANet(num_classes=19, backbone="resnet50").train()
        >>> {k: tuple(v.shape) for k, v in model(torch.randn(2, 3, 65, 81)).items()}
        {'out': (2, 19, 65, 81), 'pam': (2, 19, 65, 81), 'cam': (2, 19, 65, 81)}
    """

    def __init__(self, num_classes: int = 19, backbone: str = "resnet101", output_stride: int = 8,
                 multi_grid: Sequence[int] | None = (1, 2, 4), aux_loss: bool | None = None,
                 in_channels: int = 3, backbone_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _validate_common(backbone, _RESNETS, output_stride, in_channels, backbone_weights)
        _check_aux(aux_loss)
        self.in_channels, self.output_stride = in_channels, output_stride
        self.aux_mode = aux_loss
        self.backbone = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                       in_channels=in_channels, weights=backbone_weights,
                                       out_features=("layer4",))
        self.head = DANetHead(2048, num_classes)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        size = x.shape[2:]
        xp = _pad_to_grid(x, self.output_stride)
        fused, pam, cam = self.head(self.backbone(xp)["layer4"])
        out = {"out": _resize_crop(fused, xp.shape[2:], size)}
        if self.aux_mode is True or (self.aux_mode is None and self.training):
            out["pam"] = _resize_crop(pam, xp.shape[2:], size)
            out["cam"] = _resize_crop(cam, xp.shape[2:], size)
        return out


def danet(num_classes: int = 19, *, backbone: str = "resnet101", output_stride: int = 8,
          multi_grid: Sequence[int] | None = (1, 2, 4), aux_loss: bool | None = None, in_channels: int = 3,
          backbone_weights: str | os.PathLike | None = None) -> DANet:
    """DANet (dilated ResNet-101 at output stride 8, layer4 dilations 4, 8, 16; Cityscapes' 19
    classes). See :class:`DANet`; ``multi_grid=None`` gives the plain dilated ResNet (rate 4
    throughout layer4).

    Example::

        >>> model = danet(num_classes=19, backbone="resnet50")
    """
    return DANet(num_classes, backbone, output_stride, multi_grid, aux_loss, in_channels, backbone_weights)
