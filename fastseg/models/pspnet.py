"""PSPNet (Zhao et al., CVPR 2017) on fastseg's layers.

Dilated ResNet at output stride 8 → pyramid pooling (bins 1, 2, 3, 6; each 1×1 conv to C/4 + BN +
ReLU, upsampled and concatenated with the features) → 3×3 conv 512 + BN + ReLU + Dropout2d(0.1) →
1×1 classifier; deep supervision through an auxiliary head on ``layer3`` (1024 → 256 → classes, with
BN, ReLU and Dropout2d(0.1) as the authors' code), weighted 0.4 in the loss.

Backbone default: ResNet-50, the network of the paper's ablations (Tables 1-4, ADE20K) and of the
authors' released PSPNet50; the PASCAL VOC / Cityscapes headline results use ``backbone="resnet101"``.
The ResNet is torchvision's (7×7 stem), not the authors' deep-stem variant, so that torchvision
checkpoints load. Inputs are padded to 8k + 1 sizes and the logits upsampled with
``align_corners=True`` and cropped, as in :mod:`fastseg.models.deeplab`.
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
    _check_rates,
    _pad_to_grid,
    _resize_crop,
    _validate_common,
)
from fastseg.nn import AuxHead, PyramidPooling

__all__ = ["PSPNet", "pspnet"]


class PSPNet(nn.Module):
    """PSPNet: dilated ResNet, pyramid pooling, 3×3 conv 512, classifier; auxiliary head on layer3.

    ``aux_loss``: None (default) builds the auxiliary head and returns ``"aux"`` in train mode only
    (the paper uses it for training); True returns it in eval too; False drops the head.

    Shape: [N, in_channels, H, W] → ``{"out": [N, K, H, W]}`` (+ ``"aux"`` [N, K, H, W]).

    Example::

        >>> model = PSPNet(num_classes=21).train()
        >>> {k: tuple(v.shape) for k, v in model(torch.randn(2, 3, 65, 81)).items()}
        {'out': (2, 21, 65, 81), 'aux': (2, 21, 65, 81)}
    """

    def __init__(self, num_classes: int = 21, backbone: str = "resnet50", output_stride: int = 8,
                 bins: Sequence[int] = (1, 2, 3, 6), multi_grid: Sequence[int] | None = None,
                 aux_loss: bool | None = None, in_channels: int = 3,
                 backbone_weights: str | os.PathLike | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _validate_common(backbone, _RESNETS, output_stride, in_channels, backbone_weights)
        bins = _check_rates(bins, "bins")
        _check_aux(aux_loss)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.output_stride = in_channels, output_stride
        self.aux_in_eval = aux_loss is True
        feats = ("layer4",) if aux_loss is False else ("layer3", "layer4")
        self.backbone = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                       in_channels=in_channels, weights=backbone_weights, out_features=feats)
        self.ppm = PyramidPooling(2048, bins)
        self.head = nn.Sequential(
            nn.Conv2d(self.ppm.out_channels, 512, 3, padding=1, bias=False), nn.BatchNorm2d(512),
            nn.ReLU(inplace=True), nn.Dropout2d(dropout), nn.Conv2d(512, num_classes, 1))
        self.aux = None if aux_loss is False else AuxHead(1024, num_classes, 256, dropout)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        size = x.shape[2:]
        xp = _pad_to_grid(x, self.output_stride)
        feats = self.backbone(xp)
        out = {"out": _resize_crop(self.head(self.ppm(feats["layer4"])), xp.shape[2:], size)}
        if self.aux is not None and (self.training or self.aux_in_eval):
            out["aux"] = _resize_crop(self.aux(feats["layer3"]), xp.shape[2:], size)
        return out


def pspnet(num_classes: int = 21, *, backbone: str = "resnet50", output_stride: int = 8,
           bins: Sequence[int] = (1, 2, 3, 6), multi_grid: Sequence[int] | None = None, aux_loss: bool | None = None,
           in_channels: int = 3, backbone_weights: str | os.PathLike | None = None,
           atrous_rates: Sequence[int] | None = None) -> PSPNet:
    """PSPNet (dilated ResNet-50 at output stride 8, bins (1, 2, 3, 6), auxiliary head on layer3).
    See :class:`PSPNet`. ``atrous_rates`` is accepted for a uniform signature and must stay None
    (PSPNet has none).

    Example::

        >>> model = pspnet(num_classes=150, backbone="resnet101")
    """
    if atrous_rates is not None:
        raise ValueError("atrous_rates: PSPNet has no atrous pyramid; use bins")
    return PSPNet(num_classes, backbone, output_stride, bins, multi_grid, aux_loss, in_channels, backbone_weights)
