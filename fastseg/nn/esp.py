"""ESPNet's efficient spatial pyramid (ESP) module on the fused ``esp_pyramid`` op."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastseg.ops import esp_pyramid

__all__ = ["ESPModule"]


class ESPModule(nn.Module):
    """ESP module (Mehta et al., ECCV 2018): reduce → K parallel dilated 3×3 convs → hierarchical
    feature fusion → (+ input) → BatchNorm (eps 1e-3) → PReLU.

    The reduction is a 1×1 conv to n_out // K channels (the first branch outputs the remainder,
    n_out - (K - 1)(n_out // K)), or, with ``stride=2``, a 3×3 stride-2 conv (ESPNet's strided
    module, never residual). The pyramid and its sums are one ``fastseg.ops.esp_pyramid`` call, so
    the K branch outputs are never materialised. The residual is added when ``add`` is set, the
    stride is 1 and n_in == n_out.

    Args:
        n_in, n_out: channels; n_out >= K.
        stride: 1 or 2.
        add: the residual connection (ESPNet's ``add``; the decoder's module has it off).
        dilations: the K dilation rates (ESPNet: 1, 2, 4, 8, 16).

    Shape: [N, n_in, H, W] → [N, n_out, ceil(H / stride), ceil(W / stride)].

    Example::

        >>> m = ESPModule(64, 64)
        >>> m(torch.randn(1, 64, 32, 32)).shape
        torch.Size([1, 64, 32, 32])
    """

    def __init__(self, n_in: int, n_out: int, stride: int = 1, add: bool = True,
                 dilations: Sequence[int] = (1, 2, 4, 8, 16)) -> None:
        super().__init__()
        k = len(dilations)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if n_out < k:
            raise ValueError(f"n_out must be >= len(dilations) = {k} (one channel a branch), got {n_out}")
        n = n_out // k
        first = n_out - (k - 1) * n
        self.dilations = tuple(int(d) for d in dilations)
        self.reduce = (nn.Conv2d(n_in, n, 1, bias=False) if stride == 1
                       else nn.Conv2d(n_in, n, 3, stride=2, padding=1, bias=False))
        # nn.Conv2d's default initialisation, one [d_k, n, 3, 3] weight a branch.
        self.branches = nn.ParameterList(
            [nn.Parameter(nn.init.kaiming_uniform_(torch.empty(first if i == 0 else n, n, 3, 3), a=math.sqrt(5)))
             for i in range(k)])
        self.residual = add and stride == 1 and n_in == n_out
        self.bn = nn.BatchNorm2d(n_out, eps=1e-3)
        self.act = nn.PReLU(n_out)

    def forward(self, x: Tensor) -> Tensor:
        y = esp_pyramid(self.reduce(x), list(self.branches), dilations=self.dilations)
        if self.residual:
            y = y + x
        return self.act(self.bn(y))
