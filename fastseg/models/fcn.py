"""FCN-32s, FCN-16s and FCN-8s on VGG-16 (Long, Shelhamer & Darrell, CVPR 2015).

The structure is that of the authors' Caffe nets (fcn.berkeleyvision.org, ``voc-fcn{32,16,8}s``):

* VGG-16 with conv1_1 padded by 100 and ceil-mode pooling; fc6 a 7×7 convolution of 4096 and fc7 a
  1×1 convolution of 4096, each followed by ReLU and Dropout(0.5);
* ``score_fr`` (1×1 → classes) and, for the skips, ``score_pool4`` / ``score_pool3``, all
  zero-initialised;
* fixed bilinear deconvolutions (no bias): ``upscore`` k64/s32 (32s); ``upscore2`` k4/s2 then
  ``upscore16`` k32/s16 (16s); ``upscore2``, ``upscore_pool4`` k4/s2 and ``upscore8`` k16/s8 (8s);
* skip fusion by sum after cropping the pool4 scores at offset 5 and the pool3 scores at offset 9;
  the final crop (offset 19 / 27 / 31) returns exactly the input's H×W, whatever its size.

Choice where the nets differ: the staged nets (the default here, the ones the paper's numbers come
from) feed pool4 and pool3 to their score layers unscaled; ``at_once=True`` gives the "at-once" FCN's
fixed scaling of pool4 by 0.01 and pool3 by 0.0001 (no parameters).

Parameters with 21 classes, fixed upsampling (the deconvolutions are buffers, not parameters, as
their learning rate is 0 in Caffe): FCN-32s 134,346,581; FCN-16s 134,357,354; FCN-8s 134,362,751 —
the paper's "134M". ``learnable_upsampling=True`` makes them full C×C deconvolutions initialised to
the bilinear kernel on the diagonal (Caffe's blob shape): +1,806,336 (32s), +458,640 (16s),
+127,008 (8s).

Example::

    >>> from fastseg.models import create_model
    >>> model = create_model("fcn8s", num_classes=21).eval()
    >>> model(torch.randn(1, 3, 97, 129))["out"].shape
    torch.Size([1, 21, 97, 129])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastseg.models.backbones.vgg import VGG16, VGG16_WIDTHS, read_vgg16_checkpoint

__all__ = ["FCN", "BilinearDeconv2d", "bilinear_kernel", "fcn32s", "fcn16s", "fcn8s"]

# Offsets of Caffe's crop layers (computed by caffe.coord_map for these nets).
_CROP_POOL4, _CROP_POOL3 = 5, 9
_CROP_OUT = {32: 19, 16: 27, 8: 31}


def bilinear_kernel(size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                    ) -> Tensor:
    """The 2-D bilinear interpolation kernel [size, size] of Caffe's FCN surgery (``upsample_filt``):
    factor f = ceil(size / 2), centre c = f - 1 (odd size) or f - 0.5 (even),
    k[i, j] = (1 - |i - c| / f) (1 - |j - c| / f).

    Example::

        >>> bilinear_kernel(4)[0]
        tensor([0.0625, 0.1875, 0.1875, 0.0625])
    """
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float64, device=device)
    filt = 1 - (og - center).abs() / factor
    return torch.outer(filt, filt).to(dtype)


class BilinearDeconv2d(nn.Module):
    """Per-channel transposed convolution (no bias, no padding) holding a bilinear kernel.

    ``learnable=False`` (FCN's default; lr 0 in Caffe): the kernel is a non-persistent buffer
    [C, 1, k, k] applied channel by channel, never trained and not part of ``parameters()``.
    ``learnable=True``: a full [C, C, k, k] parameter initialised to the bilinear kernel on the
    diagonal (Caffe's Deconvolution blob), free to mix classes once trained.

    Shape: [N, C, H, W] → [N, C, (H - 1) * stride + kernel_size, (W - 1) * stride + kernel_size].

    Example::

        >>> up = BilinearDeconv2d(21, kernel_size=4, stride=2)
        >>> up(torch.randn(1, 21, 5, 7)).shape
        torch.Size([1, 21, 12, 16])
    """

    def __init__(self, channels: int, kernel_size: int, stride: int, learnable: bool = False) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.stride, self.learnable = channels, kernel_size, stride, learnable
        kernel = bilinear_kernel(kernel_size)
        if learnable:
            weight = torch.zeros(channels, channels, kernel_size, kernel_size)
            idx = torch.arange(channels)
            weight[idx, idx] = kernel
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", kernel.expand(channels, 1, kernel_size, kernel_size).clone(),
                                 persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        groups = 1 if self.learnable else self.channels
        return F.conv_transpose2d(x, self.weight.to(x.dtype), stride=self.stride, groups=groups)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, learnable={self.learnable}"


def _crop(x: Tensor, offset: int, like: Tensor) -> Tensor:
    """Caffe's Crop layer: ``x[..., offset:offset + h, offset:offset + w]`` with (h, w) from ``like``."""
    h, w = like.shape[-2:]
    return x[..., offset:offset + h, offset:offset + w]


class FCN(nn.Module):
    """FCN-32s / 16s / 8s (``stride`` 32, 16, 8) on VGG-16; see the module docstring.

    Args:
        num_classes: output classes (21 for PASCAL VOC).
        stride: 32, 16 or 8 — the finest skip used.
        in_channels: input channels.
        learnable_upsampling: train the deconvolutions (default: fixed bilinear).
        backbone_weights: path of a local torchvision VGG-16 checkpoint: ``features.*`` load into the
            backbone and, when present with matching shapes, ``classifier.0`` / ``classifier.3``
            become fc6 / fc7 (reshaped to 7×7 and 1×1 convolutions, the paper's convolutionalisation).
        at_once: scale pool4 by 0.01 and pool3 by 0.0001 before their score layers (the "at-once"
            FCN-8s); default: the staged nets, unscaled.
        widths: VGG block widths (small values for tests only).
        fc_channels: width of fc6 / fc7 (4096 in the paper).
        dropout: dropout after fc6 and fc7.

    Input is normalised as the backbone weights expect (torchvision: RGB, ImageNet mean/std).

    Shape: [N, in_channels, H, W] → {"out": [N, num_classes, H, W]} for any H, W ≥ 1.

    Example::

        >>> model = FCN(21, stride=16).eval()
        >>> model(torch.randn(2, 3, 65, 81))["out"].shape
        torch.Size([2, 21, 65, 81])
    """

    def __init__(self, num_classes: int = 21, stride: int = 8, in_channels: int = 3, *,
                 learnable_upsampling: bool = False, backbone_weights: str | os.PathLike | None = None,
                 at_once: bool = False, widths: Sequence[int] = VGG16_WIDTHS, fc_channels: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if stride not in _CROP_OUT:
            raise ValueError(f"stride must be 32, 16 or 8, got {stride!r}")
        if not isinstance(fc_channels, int) or fc_channels < 1:
            raise ValueError(f"fc_channels must be a positive int, got {fc_channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if at_once and stride == 32:
            raise ValueError("at_once scales the pool4/pool3 skips; FCN-32s has none (use stride 16 or 8)")
        self.num_classes, self.stride, self.at_once = num_classes, stride, bool(at_once)
        skips = {32: (), 16: ("pool4",), 8: ("pool3", "pool4")}[stride]
        self.backbone = VGG16(in_channels, widths=widths, first_padding=100, ceil_mode=True,
                              out_features=(*skips, "pool5"))
        c5 = self.backbone.channels["pool5"]
        self.fc6 = nn.Conv2d(c5, fc_channels, 7)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.drop6, self.drop7 = nn.Dropout(dropout), nn.Dropout(dropout)  # Caffe's Dropout is elementwise
        self.score_fr = nn.Conv2d(fc_channels, num_classes, 1)
        up = learnable_upsampling
        if stride == 32:
            self.upscore = BilinearDeconv2d(num_classes, 64, 32, up)
        else:
            self.score_pool4 = nn.Conv2d(self.backbone.channels["pool4"], num_classes, 1)
            self.upscore2 = BilinearDeconv2d(num_classes, 4, 2, up)
            if stride == 16:
                self.upscore16 = BilinearDeconv2d(num_classes, 32, 16, up)
            else:
                self.score_pool3 = nn.Conv2d(self.backbone.channels["pool3"], num_classes, 1)
                self.upscore_pool4 = BilinearDeconv2d(num_classes, 4, 2, up)
                self.upscore8 = BilinearDeconv2d(num_classes, 16, 8, up)
        # fc6/fc7 as torchvision initialises its classifier; score layers zero (the paper: "zero-initialized")
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)
                nn.init.zeros_(getattr(self, name).bias)
        if backbone_weights is not None:
            self.load_backbone_weights(backbone_weights)

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Load a local torchvision VGG-16 checkpoint: ``features.*`` into the backbone, and
        ``classifier.0`` / ``classifier.3`` (fc6 [4096, 25088], fc7 [4096, 4096]) into fc6 / fc7
        when present. Raises ``ValueError`` naming any tensor whose shape does not fit."""
        state = read_vgg16_checkpoint(path)
        self.backbone.load_torchvision_state(state)
        for src, fc in (("classifier.0", self.fc6), ("classifier.3", self.fc7)):
            if f"{src}.weight" not in state:
                continue
            w, b = state[f"{src}.weight"], state.get(f"{src}.bias")
            if w.numel() != fc.weight.numel() or b is None or b.shape != fc.bias.shape:
                raise ValueError(f"backbone_weights: {src} has shape {tuple(w.shape)}, this FCN's "
                                 f"{'fc6' if fc is self.fc6 else 'fc7'} needs {tuple(fc.weight.shape)}")
            with torch.no_grad():
                fc.weight.copy_(w.reshape(fc.weight.shape))  # fc (C·7·7 → 4096) is the 7×7 conv, C-major
                fc.bias.copy_(b)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.backbone.in_channels:
            raise ValueError(f"x must be [N, {self.backbone.in_channels}, H, W], got {tuple(x.shape)}")
        feats = self.backbone(x)
        h = self.drop6(self.relu(self.fc6(feats["pool5"])))
        h = self.drop7(self.relu(self.fc7(h)))
        score = self.score_fr(h)
        if self.stride == 32:
            return {"out": _crop(self.upscore(score), _CROP_OUT[32], x)}
        up2 = self.upscore2(score)
        pool4 = feats["pool4"] * 0.01 if self.at_once else feats["pool4"]
        fuse4 = up2 + _crop(self.score_pool4(pool4), _CROP_POOL4, up2)
        if self.stride == 16:
            return {"out": _crop(self.upscore16(fuse4), _CROP_OUT[16], x)}
        up4 = self.upscore_pool4(fuse4)
        pool3 = feats["pool3"] * 0.0001 if self.at_once else feats["pool3"]
        fuse3 = up4 + _crop(self.score_pool3(pool3), _CROP_POOL3, up4)
        return {"out": _crop(self.upscore8(fuse3), _CROP_OUT[8], x)}


def fcn32s(num_classes: int = 21, in_channels: int = 3, learnable_upsampling: bool = False,
           backbone_weights: str | os.PathLike | None = None, **kwargs: Any) -> FCN:
    """FCN-32s (VGG-16, single k64/s32 upsampling). Further keywords as :class:`FCN`.

    Example::

        >>> fcn32s(num_classes=21).eval()(torch.randn(1, 3, 97, 129))["out"].shape
        torch.Size([1, 21, 97, 129])
    """
    return FCN(num_classes, 32, in_channels, learnable_upsampling=learnable_upsampling,
               backbone_weights=backbone_weights, **kwargs)


def fcn16s(num_classes: int = 21, in_channels: int = 3, learnable_upsampling: bool = False,
           backbone_weights: str | os.PathLike | None = None, **kwargs: Any) -> FCN:
    """FCN-16s (VGG-16, pool4 skip). Further keywords as :class:`FCN`.

    Example::

        >>> fcn16s(num_classes=21).eval()(torch.randn(1, 3, 97, 129))["out"].shape
        torch.Size([1, 21, 97, 129])
    """
    return FCN(num_classes, 16, in_channels, learnable_upsampling=learnable_upsampling,
               backbone_weights=backbone_weights, **kwargs)


def fcn8s(num_classes: int = 21, in_channels: int = 3, learnable_upsampling: bool = False,
          backbone_weights: str | os.PathLike | None = None, **kwargs: Any) -> FCN:
    """FCN-8s (VGG-16, pool4 and pool3 skips). Further keywords as :class:`FCN`.

    Example::

        >>> fcn8s(num_classes=21).eval()(torch.randn(1, 3, 97, 129))["out"].shape
        torch.Size([1, 21, 97, 129])
    """
    return FCN(num_classes, 8, in_channels, learnable_upsampling=learnable_upsampling,
               backbone_weights=backbone_weights, **kwargs)
