"""Modified Aligned Xception-65 (DeepLab v3+) on :class:`fastseg.nn.SeparableConv2d`.

Layout of DeepLab's TensorFlow ``xception_65``: a stem (3×3 conv 32 stride 2, 3×3 conv 64), an
entry flow of three blocks (128, 256, 728 channels) that downsample with a stride-2 separable conv
and a 1×1 strided shortcut conv, a middle flow of 16 units of three 728-channel separable convs with
identity shortcuts, and an exit flow [728, 1024, 1024] (conv shortcut, stride 2) then
[1536, 1536, 2048] (no shortcut). Every 3×3 depthwise conv is followed by BatchNorm + ReLU, as the
DeepLab v3+ paper describes. Past the requested output stride, strides become atrous rates
(TensorFlow's ``stack_blocks_dense`` rule).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional as F

from fastseg.models.backbones.resnet import _check_grid, load_backbone_weights
from fastseg.nn import SeparableConv2d

__all__ = ["AlignedXception", "XceptionModule", "xception65"]

# (name, depths, stride, shortcut) per block; middle flow appended in the constructor.
_ENTRY = (("entry1", (128, 128, 128), 2, "conv"), ("entry2", (256, 256, 256), 2, "conv"),
          ("entry3", (728, 728, 728), 2, "conv"))
_EXIT = (("exit1", (728, 1024, 1024), 2, "conv"), ("exit2", (1536, 1536, 2048), 1, "none"))
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon; kept so that converted DeepLab checkpoints reproduce


class XceptionModule(nn.Module):
    """One Xception unit: three 3×3 separable convs (the last one strided) plus a shortcut.

    ``shortcut``: ``"conv"`` (1×1 strided conv + BN), ``"sum"`` (identity) or ``"none"``.
    With a shortcut the unit is pre-activated as in DeepLab's code: ReLU, sep conv, ReLU, sep conv,
    ReLU, sep conv (no final ReLU), then the shortcut of the un-activated input is added. Without one
    (the last exit-flow block) every separable conv ends in ReLU. ``tap=True`` also returns the second
    conv's output before its ReLU (DeepLab v3+'s low-level features from entry-flow block 2).

    Shape: [N, in_ch, H, W] → [N, depths[2], ceil(H / stride), ceil(W / stride)].

    Example::

        >>> unit = XceptionModule(64, (128, 128, 128), stride=2)
        >>> unit(torch.randn(1, 64, 33, 33)).shape
        torch.Size([1, 128, 17, 17])
    """

    def __init__(self, in_ch: int, depths: Sequence[int], stride: int = 1, dilation: int | Sequence[int] = 1,
                 shortcut: str = "sum", tap: bool = False) -> None:
        super().__init__()
        if shortcut not in ("conv", "sum", "none"):
            raise ValueError(f"shortcut must be 'conv', 'sum' or 'none', got {shortcut!r}")
        rates = (dilation,) * 3 if isinstance(dilation, int) else tuple(dilation)
        self.preact, self.tap = shortcut != "none", tap
        chans = (in_ch, *depths)
        self.convs = nn.ModuleList(
            SeparableConv2d(chans[i], chans[i + 1], 3, stride=stride if i == 2 else 1, dilation=rates[i],
                            relu=not self.preact or (i == 0 or (i == 1 and not tap)))
            for i in range(3))
        self.shortcut: nn.Module | None = None
        if shortcut == "conv":
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, depths[2], 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(depths[2]))
        elif shortcut == "sum" and (in_ch != depths[2] or stride != 1):
            raise ValueError("an identity shortcut needs in_ch == depths[2] and stride 1")
        self.has_sum = shortcut != "none"

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        h = F.relu(x) if self.preact else x
        h = self.convs[0](h)
        h = self.convs[1](h)
        low = h
        if self.tap and self.preact:
            h = F.relu(h)
        h = self.convs[2](h)
        if self.has_sum:
            h = h + (self.shortcut(x) if self.shortcut is not None else x)
        return (h, low) if self.tap else h


class AlignedXception(nn.Module):
    """Modified Aligned Xception (DeepLab v3+) returning intermediate features by name.

    Features (name: channels, stride at output stride 16): ``stem`` 64 /2, ``entry1`` 128 /4,
    ``low_level`` 256 /4 (entry-flow block 2 before its strided conv: the v3+ decoder's input),
    ``entry2`` 256 /8, ``entry3`` 728 /16, ``middle`` 728 /16, ``exit1`` 1024 /16, ``exit2`` 2048 /16.
    At output stride 8 ``entry3`` onwards are /8; at 32 ``exit1``/``exit2`` are /32. ``forward``
    returns the names in ``out_features`` and stops after the last one.

    Args:
        output_stride: 8, 16 or 32.
        multi_grid: rate multipliers of the three convs of the last block (None: (1, 1, 1)).
        in_channels: input channels.
        middle_units: units in the middle flow (16 for Xception-65).
        width_multiplier: scales every channel count (1.0 is the paper's network; small values make
            cheap variants for tests).
        weights: path of a local checkpoint of this module's ``state_dict`` (never downloaded).
        out_features: names to return (default: all).

    Shape: [N, in_channels, H, W] → {name: [N, C, ceil(H / s), ceil(W / s)]}.

    Example::

        >>> net = xception65(output_stride=16, out_features=("low_level", "exit2"))
        >>> {k: tuple(v.shape) for k, v in net(torch.randn(1, 3, 65, 65)).items()}
        {'low_level': (1, 256, 17, 17), 'exit2': (1, 2048, 5, 5)}
    """

    def __init__(self, output_stride: int = 16, multi_grid: Sequence[int] | None = None, in_channels: int = 3,
                 middle_units: int = 16, width_multiplier: float = 1.0, weights: str | os.PathLike | None = None,
                 out_features: Sequence[str] | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(middle_units, int) or middle_units < 0:
            raise ValueError(f"middle_units must be a non-negative int, got {middle_units!r}")
        if not isinstance(width_multiplier, (int, float)) or not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be > 0, got {width_multiplier!r}")
        grid = _check_grid(multi_grid, 3)
        names = ("stem", "entry1", "low_level", "entry2", "entry3", "middle", "exit1", "exit2")
        out_features = tuple(names if out_features is None else out_features)
        if not out_features or any(f not in names for f in out_features):
            raise ValueError(f"out_features must name some of {names}, got {out_features!r}")

        def w(c: int) -> int:
            return max(1, round(c * width_multiplier))

        c32, c64 = w(32), w(64)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c32), nn.ReLU(inplace=True),
            nn.Conv2d(c32, c64, 3, padding=1, bias=False), nn.BatchNorm2d(c64), nn.ReLU(inplace=True))
        blocks = [*_ENTRY, *((f"middle{i}", (728, 728, 728), 1, "sum") for i in range(middle_units)), *_EXIT]
        # TensorFlow's stack_blocks_dense: once the output stride is reached, a block keeps the
        # current rate with stride 1, and the rate of the blocks after it grows by the dropped stride.
        current, rate, in_ch = 2, 1, c64
        self.strides = {"stem": 2}
        self.channels = {"stem": c64}
        entry, middle, exit_ = [], [], []
        for name, depths, stride, shortcut in blocks:
            depths = tuple(w(c) for c in depths)
            if current == output_stride:
                block_stride, block_rate, rate = 1, rate, rate * stride
            else:
                block_stride, block_rate, current = stride, 1, current * stride
            rates = tuple(block_rate * g for g in grid) if name == "exit2" else block_rate
            unit = XceptionModule(in_ch, depths, block_stride, rates, shortcut, tap=name == "entry2")
            (entry if name.startswith("entry") else middle if name.startswith("middle") else exit_).append(unit)
            in_ch = depths[2]
            key = "middle" if name.startswith("middle") else name
            self.strides[key], self.channels[key] = current, in_ch
            if name == "entry2":
                self.strides["low_level"], self.channels["low_level"] = current // 2, depths[1]
        self.strides.setdefault("middle", self.strides["entry3"])
        self.channels.setdefault("middle", self.channels["entry3"])
        self.entry1, self.entry2, self.entry3 = entry
        self.middle = nn.Sequential(*middle)
        self.exit1, self.exit2 = exit_
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = _BN_EPS
        self.output_stride = output_stride
        self.out_features = out_features
        self._last = max(names.index(f) for f in out_features)
        self._names = names
        if weights is not None:
            load_backbone_weights(self, weights)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        want = self.out_features
        x = self.stem(x)
        feats["stem"] = x
        if self._last >= 1:
            x = self.entry1(x)
            feats["entry1"] = x
        if self._last >= 2:
            x, feats["low_level"] = self.entry2(x)
            feats["entry2"] = x
        if self._last >= 4:
            x = self.entry3(x)
            feats["entry3"] = x
        if self._last >= 5:
            x = self.middle(x)
            feats["middle"] = x
        if self._last >= 6:
            x = self.exit1(x)
            feats["exit1"] = x
        if self._last >= 7:
            x = self.exit2(x)
            feats["exit2"] = x
        return {k: feats[k] for k in want}


def xception65(**kwargs) -> AlignedXception:
    """Modified Aligned Xception-65; keyword arguments as :class:`AlignedXception`."""
    return AlignedXception(**kwargs)
