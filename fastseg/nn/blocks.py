"""Small generic blocks: CoordConv's coordinate channels and stacks of conv + GroupNorm + ReLU (the heads of
SOLO / SOLOv2 and other FPN heads).

Example::

    >>> x = torch.randn(2, 64, 13, 17)
    >>> add_coords(x).shape                       # two extra channels: x then y in [-1, 1]
    torch.Size([2, 66, 13, 17])
    >>> conv_gn_stack(66, 64, 3)(add_coords(x)).shape
    torch.Size([2, 64, 13, 17])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvGNReLU", "add_coords", "conv_gn_stack", "coord_channels"]


def coord_channels(x: Tensor) -> Tensor:
    """CoordConv's coordinates of ``x`` [N, C, H, W]: [N, 2, H, W], channel 0 the column and channel 1 the row,
    each running linearly from -1 to 1 across the map (Liu et al. 2018; SOLO's convention)."""
    n, _, h, w = x.shape
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    grid = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)])
    return grid.unsqueeze(0).expand(n, 2, h, w)


def add_coords(x: Tensor) -> Tensor:
    """``x`` [N, C, H, W] with :func:`coord_channels` appended: [N, C + 2, H, W]."""
    return torch.cat([x, coord_channels(x)], dim=1)


class ConvGNReLU(nn.Sequential):
    """k×k conv (no bias, "same" padding) → GroupNorm(``groups``) → ReLU.

    Shape: [N, in_ch, H, W] → [N, out_ch, H, W]; ``out_ch`` must be divisible by ``groups``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, groups: int = 32) -> None:
        if out_ch % groups:
            raise ValueError(f"out_ch ({out_ch}) must be divisible by the GroupNorm groups ({groups})")
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.GroupNorm(groups, out_ch), nn.ReLU(inplace=True))


def conv_gn_stack(in_ch: int, channels: int, depth: int, groups: int = 32) -> nn.Sequential:
    """``depth`` stacked 3×3 :class:`ConvGNReLU` layers of ``channels``, the first taking ``in_ch`` (depth 0:
    an identity, which needs ``in_ch == channels`` to be useful)."""
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be an int >= 0, got {depth!r}")
    return nn.Sequential(*(ConvGNReLU(in_ch if i == 0 else channels, channels, 3, groups) for i in range(depth)))
