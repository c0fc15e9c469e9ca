"""DeepLab v2, v3 and v3+ on fastseg's layers.

* DeepLab v2 (Chen et al., TPAMI 2017): dilated ResNet-101 at output stride 8, ASPP-L (rates 6, 12,
  18, 24, each branch a 3×3 conv straight to class scores, summed), optional dense-CRF refinement.
* DeepLab v3 (Chen et al., 2017): dilated ResNet-101, output stride 16 (atrous rates 6, 12, 18;
  doubled at 8), multi-grid (1, 2, 4) in the last stage, ASPP with image pooling, 1×1 classifier.
* DeepLab v3+ (Chen et al., ECCV 2018): the v3 encoder with atrous separable convs on Modified
  Aligned Xception-65 (or ResNet-50/101), and a decoder fusing stride-4 low-level features.

Every model returns ``{"out": logits [N, K, H, W]}`` at the input's size for any H×W. Inputs are
zero-padded at the bottom/right to the next size of the form ``output_stride·k + 1`` (DeepLab's
``crop_size`` convention, e.g. 513; zero is the mean pixel of a normalised image), where every
feature map is corner-aligned with the image, so the bilinear upsampling (``align_corners=True``, as
DeepLab's TF code) is exact; the logits are then cropped back to H×W.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastseg.models.backbones import build_backbone
from fastseg.nn import ASPP, ASPPL, AuxHead, DeepLabV3PlusDecoder
from fastseg.postprocess import crf_refine

__all__ = ["DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "deeplabv2", "deeplabv3", "deeplabv3plus"]

# DeepLab v2's CRF (PASCAL VOC): 10 mean-field iterations; Gaussian kernel weight 3, xy std 1;
# bilateral kernel weight 4, xy std 67, rgb std 3.
DEEPLAB_V2_CRF = {"iterations": 10, "pos_compat": 3.0, "pos_sxy": 1.0, "bi_compat": 4.0, "bi_sxy": 67.0,
                  "bi_srgb": 3.0}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RESNETS = ("resnet50", "resnet101")


# --- helpers shared with fastseg.models.pspnet ---------------------------------------------------

def _check_int(value: object, name: str, choices: Sequence[int] | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (choices and value not in choices):
        want = f"one of {tuple(choices)}" if choices else "a positive int"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


def _check_rates(value: object, name: str) -> tuple[int, ...]:
    try:
        rates = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        rates = ()
    if not rates or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
    return rates


def _check_aux(aux_loss: object) -> bool | None:
    if aux_loss is not None and not isinstance(aux_loss, bool):
        raise ValueError(f"aux_loss must be None, True or False, got {aux_loss!r}")
    return aux_loss


def _check_input(x: Tensor, in_channels: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != in_channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [N, {in_channels}, H, W] tensor, got {shape}")
    if x.shape[0] == 0 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must be non-empty, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")


def _pad_to_grid(x: Tensor, stride: int) -> Tensor:
    """Zero-pad bottom/right so that H - 1 and W - 1 are multiples of ``stride``."""
    ph, pw = (1 - x.shape[2]) % stride, (1 - x.shape[3]) % stride
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def _resize_crop(logits: Tensor, padded: Sequence[int], size: Sequence[int]) -> Tensor:
    """Upsample corner-aligned ``logits`` to the padded input size, then crop to ``size``."""
    out = F.interpolate(logits, size=(padded[0], padded[1]), mode="bilinear", align_corners=True)
    if padded[0] != size[0] or padded[1] != size[1]:
        out = out[:, :, : size[0], : size[1]]
    return out


def _atrous_rates(atrous_rates: Sequence[int] | None, output_stride: int) -> tuple[int, ...]:
    """The paper's rates (6, 12, 18) at output stride 16, doubled at 8, unless given."""
    if atrous_rates is None:
        return (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    return _check_rates(atrous_rates, "atrous_rates")


def _validate_common(backbone: str, choices: Sequence[str], output_stride: int, in_channels: int,
                     backbone_weights: str | os.PathLike | None) -> None:
    if backbone not in choices:
        raise ValueError(f"backbone must be one of {tuple(choices)}, got {backbone!r}")
    _check_int(output_stride, "output_stride", (8, 16))
    _check_int(in_channels, "in_channels")
    if backbone_weights is not None and not os.path.isfile(backbone_weights):
        raise ValueError(f"backbone_weights: no such file {os.fspath(backbone_weights)!r}")


# --- models -----------------------------------------------------------------------------------

class DeepLabV2(nn.Module):
    """DeepLab v2: dilated ResNet at output stride 8 + ASPP-L, optional dense CRF in eval.

    ``forward(x, image=None)``: ``x`` [N, in_channels, H, W] normalised images. Returns
    ``{"out": logits [N, K, H, W]}``; with ``crf=True`` in eval mode ``"out"`` holds the CRF-refined
    probabilities (DeepLab's CRF parameters, :data:`DEEPLAB_V2_CRF`) and ``"logits"`` the network's
    logits. The CRF needs the RGB image in 0..255: pass ``image`` ([N, 3, H, W], uint8 or float in
    0..255), or leave it None and it is recovered from ``x`` as ``255·(x·image_std + image_mean)``
    (torchvision's ImageNet normalisation by default).

    Example::

        >>> model = DeepLabV2(num_classes=21, crf=True).eval()
        >>> model(torch.randn(1, 3, 65, 81))["out"].shape   # probabilities, CRF-refined
        torch.Size([1, 21, 65, 81])
    """

    def __init__(self, num_classes: int = 21, backbone: str = "resnet101", output_stride: int = 8,
                 atrous_rates: Sequence[int] = (6, 12, 18, 24), multi_grid: Sequence[int] | None = None,
                 in_channels: int = 3, backbone_weights: str | os.PathLike | None = None, crf: bool = False,
                 crf_params: dict | None = None, image_mean: Sequence[float] = _IMAGENET_MEAN,
                 image_std: Sequence[float] = _IMAGENET_STD) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _validate_common(backbone, _RESNETS, output_stride, in_channels, backbone_weights)
        rates = _check_rates(atrous_rates, "atrous_rates")
        if crf and in_channels != 3:
            raise ValueError(f"crf needs RGB input (in_channels=3), got in_channels={in_channels}")
        params = dict(DEEPLAB_V2_CRF)
        if crf_params is not None:
            unknown = set(crf_params) - set(params)
            if unknown:
                raise ValueError(f"crf_params: unknown keys {sorted(unknown)}; known: {sorted(params)}")
            params.update(crf_params)
        if len(tuple(image_mean)) != 3 or len(tuple(image_std)) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean and image_std must be 3 values (std > 0), got {image_mean!r}, {image_std!r}")
        self.in_channels, self.output_stride, self.crf, self.crf_params = in_channels, output_stride, crf, params
        self.backbone = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                       in_channels=in_channels, weights=backbone_weights, out_features=("layer4",))
        self.classifier = ASPPL(2048, num_classes, rates)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), False)

    def forward(self, x: Tensor, image: Tensor | None = None) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        size = x.shape[2:]
        xp = _pad_to_grid(x, self.output_stride)
        logits = _resize_crop(self.classifier(self.backbone(xp)["layer4"]), xp.shape[2:], size)
        if not self.crf or self.training:
            return {"out": logits}
        if image is None:
            image = ((x.float() * self.image_std + self.image_mean) * 255.0).clamp(0.0, 255.0)
        elif image.dim() != 4 or image.shape[0] != x.shape[0] or image.shape[1] != 3 or image.shape[2:] != size:
            raise ValueError(f"image must be [N, 3, H, W] = [{x.shape[0]}, 3, {size[0]}, {size[1]}], "
                             f"got {tuple(image.shape)}")
        return {"out": crf_refine(logits, image, **self.crf_params), "logits": logits}


class DeepLabV3(nn.Module):
    """DeepLab v3: dilated backbone, ASPP (1×1, three atrous 3×3, image pooling; 256 channels with
    BN), 1×1 classifier. The paper has no auxiliary head; ``aux_loss=True`` adds torchvision's
    (:class:`fastseg.nn.AuxHead` on ResNet ``layer3`` / the Xception middle flow), returned as
    ``"aux"`` in train and eval.

    Shape: [N, in_channels, H, W] → ``{"out": [N, K, H, W]}`` (+ ``"aux"``).

    Example::

        >>> model = DeepLabV3(num_classes=21).eval()
        >>> model(torch.randn(1, 3, 97, 129))["out"].shape
        torch.Size([1, 21, 97, 129])
    """

    def __init__(self, num_classes: int = 21, backbone: str = "resnet101", output_stride: int = 16,
                 atrous_rates: Sequence[int] | None = None, multi_grid: Sequence[int] | None = None,
                 aux_loss: bool | None = None, in_channels: int = 3,
                 backbone_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _validate_common(backbone, (*_RESNETS, "xception65"), output_stride, in_channels, backbone_weights)
        rates = _atrous_rates(atrous_rates, output_stride)
        self.aux_loss = bool(_check_aux(aux_loss))
        self.in_channels, self.output_stride = in_channels, output_stride
        resnet = backbone in _RESNETS
        self._high, self._mid = ("layer4", "layer3") if resnet else ("exit2", "middle")
        feats = (self._mid, self._high) if self.aux_loss else (self._high,)
        self.backbone = build_backbone(backbone, output_stride=output_stride,
                                       multi_grid=(1, 2, 4) if multi_grid is None else multi_grid,
                                       in_channels=in_channels, weights=backbone_weights, out_features=feats)
        self.aspp = ASPP(self.backbone.channels[self._high], 256, rates)
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.aux = AuxHead(self.backbone.channels[self._mid], num_classes) if self.aux_loss else None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        size = x.shape[2:]
        xp = _pad_to_grid(x, self.output_stride)
        feats = self.backbone(xp)
        out = {"out": _resize_crop(self.classifier(self.aspp(feats[self._high])), xp.shape[2:], size)}
        if self.aux is not None:
            out["aux"] = _resize_crop(self.aux(feats[self._mid]), xp.shape[2:], size)
        return out


class DeepLabV3Plus(nn.Module):
    """DeepLab v3+: encoder (backbone + ASPP with atrous separable convs), decoder on the stride-4
    low-level features (Xception entry-flow block 2 or ResNet ``layer1``), logits upsampled ×4.

    ``width_multiplier`` (Xception only) scales every channel count of the backbone and the heads
    (ASPP 256, decoder 48/256): 1.0 is the paper's network; smaller values give cheap variants for
    tests and experiments.

    Shape: [N, in_channels, H, W] → ``{"out": [N, K, H, W]}``.

    Example::

        >>> model = DeepLabV3Plus(num_classes=21).eval()
        >>> model(torch.randn(1, 3, 65, 81))["out"].shape
        torch.Size([1, 21, 65, 81])
    """

    def __init__(self, num_classes: int = 21, backbone: str = "xception65", output_stride: int = 16,
                 atrous_rates: Sequence[int] | None = None, multi_grid: Sequence[int] | None = None,
                 in_channels: int = 3, backbone_weights: str | os.PathLike | None = None,
                 width_multiplier: float = 1.0) -> None:
        super().__init__()
        _check_int(num_classes, "num_classes")
        _validate_common(backbone, ("xception65", *_RESNETS), output_stride, in_channels, backbone_weights)
        rates = _atrous_rates(atrous_rates, output_stride)
        resnet = backbone in _RESNETS
        if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
        if resnet and width_multiplier != 1.0:
            raise ValueError("width_multiplier applies to the xception65 backbone only")
        if multi_grid is None:  # TF DeepLab: none on Xception; ResNet keeps DeepLab v3's (1, 2, 4)
            multi_grid = (1, 2, 4) if resnet else (1, 1, 1)
        self.in_channels, self.output_stride = in_channels, output_stride
        self._low, self._high = ("layer1", "layer4") if resnet else ("low_level", "exit2")
        extra = {} if resnet else {"width_multiplier": width_multiplier}
        self.backbone = build_backbone(backbone, output_stride=output_stride, multi_grid=multi_grid,
                                       in_channels=in_channels, weights=backbone_weights,
                                       out_features=(self._low, self._high), **extra)

        def w(c: int) -> int:
            return max(1, round(c * width_multiplier))

        self.aspp = ASPP(self.backbone.channels[self._high], w(256), rates, separable=True)
        self.decoder = DeepLabV3PlusDecoder(self.backbone.channels[self._low], num_classes, encoder_channels=w(256),
                                            low_level_reduced=w(48), channels=w(256))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        _check_input(x, self.in_channels)
        size = x.shape[2:]
        xp = _pad_to_grid(x, self.output_stride)
        feats = self.backbone(xp)
        logits = self.decoder(self.aspp(feats[self._high]), feats[self._low])
        return {"out": _resize_crop(logits, xp.shape[2:], size)}


# --- builders (fastseg.models.create_model) ---------------------------------------------------------

def _no_aux(aux_loss: object, name: str) -> None:
    if _check_aux(aux_loss):
        raise ValueError(f"aux_loss: {name} has no auxiliary head in its paper; use deeplabv3 or pspnet")


def deeplabv2(num_classes: int = 21, *, backbone: str = "resnet101", output_stride: int = 8,
              atrous_rates: Sequence[int] = (6, 12, 18, 24), multi_grid: Sequence[int] | None = None,
              aux_loss: bool | None = None, in_channels: int = 3, backbone_weights: str | os.PathLike | None = None,
              crf: bool = False, crf_params: dict | None = None, image_mean: Sequence[float] = _IMAGENET_MEAN,
              image_std: Sequence[float] = _IMAGENET_STD) -> DeepLabV2:
    """DeepLab v2 (ResNet-101, output stride 8, ASPP-L 6/12/18/24; ``crf=True``: CRF-refined
    probabilities in eval). See :class:`DeepLabV2`.

    Example::

        >>> model = deeplabv2(num_classes=21)
    """
    _no_aux(aux_loss, "deeplabv2")
    return DeepLabV2(num_classes, backbone, output_stride, atrous_rates, multi_grid, in_channels, backbone_weights,
                     crf, crf_params, image_mean, image_std)


def deeplabv3(num_classes: int = 21, *, backbone: str = "resnet101", output_stride: int = 16,
              atrous_rates: Sequence[int] | None = None, multi_grid: Sequence[int] | None = None,
              aux_loss: bool | None = None, in_channels: int = 3,
              backbone_weights: str | os.PathLike | None = None) -> DeepLabV3:
    """DeepLab v3 (ResNet-101, output stride 16, rates 6/12/18 — 12/24/36 at stride 8 —, multi-grid
    (1, 2, 4) when ``multi_grid`` is None; (1, 1, 1) turns it off). See :class:`DeepLabV3`.

    Example::

        >>> model = deeplabv3(num_classes=21, output_stride=8, aux_loss=True)
    """
    return DeepLabV3(num_classes, backbone, output_stride, atrous_rates, multi_grid, aux_loss, in_channels,
                     backbone_weights)


def deeplabv3plus(num_classes: int = 21, *, backbone: str = "xception65", output_stride: int = 16,
                  atrous_rates: Sequence[int] | None = None, multi_grid: Sequence[int] | None = None,
                  aux_loss: bool | None = None, in_channels: int = 3,
                  backbone_weights: str | os.PathLike | None = None, width_multiplier: float = 1.0) -> DeepLabV3Plus:
    """DeepLab v3+ (Xception-65, output stride 16, separable ASPP 6/12/18 and decoder; also
    ``backbone="resnet101"``/``"resnet50"``). ``multi_grid=None`` means none on Xception (TF
    DeepLab's default) and (1, 2, 4) on ResNet (the v3 encoder). See :class:`DeepLabV3Plus`.

    Example::

        >>> model = deeplabv3plus(num_classes=21, backbone="resnet50", output_stride=8)
    """
    _no_aux(aux_loss, "deeplabv3plus")
    return DeepLabV3Plus(num_classes, backbone, output_stride, atrous_rates, multi_grid, in_channels,
                         backbone_weights, width_multiplier)
