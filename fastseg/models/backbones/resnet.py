"""Dilated ResNet-50/101 (torchvision's ResNet) returning intermediate features by name.

The stride-2 stages past the requested output stride become dilated (torchvision's
``replace_stride_with_dilation``); parameter names are torchvision's, so a torchvision ResNet
checkpoint loads as is (its ``fc.*`` entries are ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

__all__ = ["DilatedResNet", "resnet50", "resnet101", "load_backbone_weights"]

_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_CHANNELS = {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")


def load_backbone_weights(module: nn.Module, path: str | os.PathLike, *, ignore: Sequence[str] = ()) -> None:
    """Load a local checkpoint into ``module`` (strict, except keys starting with a prefix in
    ``ignore``). Accepts a bare state dict or one nested under ``"state_dict"`` / ``"model"``.
    A first conv whose input channels differ from the checkpoint's (``in_channels != 3``) is adapted
    as timm does: the RGB filters tiled over the new channels and scaled by 3 / in_channels."""
    if not os.path.isfile(path):
        raise ValueError(f"weights: no such file {os.fspath(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {os.fspath(path)!r} holds no state dict")
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore)}
    own = module.state_dict()
    for key, value in list(state.items()):
        target = own.get(key)
        if target is not None and value.dim() == 4 and target.shape != value.shape \
                and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            c_in = target.shape[1]
            reps = -(-c_in // value.shape[1])
            state[key] = value.repeat(1, reps, 1, 1)[:, :c_in] * (value.shape[1] / c_in)
    module.load_state_dict(state, strict=True)


def _check_grid(multi_grid: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if multi_grid is None:
        return (1,) * n
    grid = tuple(multi_grid)
    if len(grid) != n or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid):
        raise ValueError(f"multi_grid must be {n} positive ints (one per block of the last stage), got {multi_grid!r}")
    return grid


class DilatedResNet(nn.Module):
    """torchvision's ResNet-50/101 at output stride 8, 16 or 32, without the classifier.

    Dilation: every block of a stage whose stride is removed uses the stage's rate (2 for the first
    removed stage, 4 for the second), as DeepLab's and PSPNet's reference code do (torchvision keeps the
    previous rate in a dilated stage's first block). ``multi_grid`` (DeepLab v3) multiplies the rate of
    each ``layer4`` block: (1, 2, 4) at output stride 16 gives rates (2, 4, 8).

    Features (name: channels, stride): ``stem`` 64 /2 (conv1-bn-relu, before max-pooling), ``layer1``
    256 /4, ``layer2`` 512 /8, ``layer3`` 1024 /min(16, os), ``layer4`` 2048 /os. ``forward`` returns
    the names in ``out_features`` and stops after the last one.

    Args:
        depth: 50 or 101.
        output_stride: 8, 16 or 32.
        multi_grid: per-block rate multipliers of ``layer4`` (3 ints), None for (1, 1, 1).
        in_channels: input channels.
        weights: path of a local torchvision ResNet checkpoint (never downloaded).
        out_features: names to return (default: all).

    Shape: [N, in_channels, H, W] → {name: [N, C, ceil(H / s), ceil(W / s)]}.

    Example::

        >>> net = DilatedResNet(101, output_stride=8, out_features=("layer1", "layer4"))
        >>> {k: tuple(v.shape) for k, v in net(torch.randn(1, 3, 65, 65)).items()}
        {'layer1': (1, 256, 17, 17), 'layer4': (1, 2048, 9, 9)}
    """

    def __init__(self, depth: int = 101, output_stride: int = 16, multi_grid: Sequence[int] | None = None,
                 in_channels: int = 3, weights: str | os.PathLike | None = None,
                 out_features: Sequence[str] | None = None) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise ValueError(f"depth must be one of {sorted(_DEPTHS)}, got {depth!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        out_features = tuple(_STAGES if out_features is None else out_features)
        unknown = [f for f in out_features if f not in _STAGES]
        if unknown or not out_features:
            raise ValueError(f"out_features must name some of {_STAGES}, got {out_features!r}")
        grid = _check_grid(multi_grid, _DEPTHS[depth][3])
        dilate = (False, output_stride <= 8, output_stride <= 16)
        net = tv_resnet.ResNet(tv_resnet.Bottleneck, list(_DEPTHS[depth]), replace_stride_with_dilation=list(dilate))
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

        rate = 1
        self.strides = {"stem": 2, "layer1": 4, "layer2": 8}
        stride = 8
        for name, dilated in zip(("layer3", "layer4"), dilate[1:], strict=True):
            if dilated:
                rate *= 2
            else:
                stride *= 2
            self.strides[name] = stride
            layer = getattr(self, name)
            mults = grid if name == "layer4" else (1,) * len(layer)
            for block, m in zip(layer, mults, strict=True):
                block.conv2.dilation = block.conv2.padding = (rate * m, rate * m)
        self.output_stride = output_stride
        self.channels = {k: _CHANNELS[k] for k in _STAGES}
        self.out_features = out_features
        self._last = max(_STAGES.index(f) for f in out_features)
        if weights is not None:
            load_backbone_weights(self, weights, ignore=("fc.",))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        x = self.relu(self.bn1(self.conv1(x)))
        if "stem" in self.out_features:
            feats["stem"] = x
        x = self.maxpool(x)
        for i, name in enumerate(_STAGES[1:], start=1):
            if i > self._last:
                break
            x = getattr(self, name)(x)
            if name in self.out_features:
                feats[name] = x
        return feats


def resnet50(**kwargs) -> DilatedResNet:
    """Dilated ResNet-50; keyword arguments as :class:`DilatedResNet`."""
    return DilatedResNet(50, **kwargs)


def resnet101(**kwargs) -> DilatedResNet:
    """Dilated ResNet-101; keyword arguments as :class:`DilatedResNet`."""
    return DilatedResNet(101, **kwargs)
