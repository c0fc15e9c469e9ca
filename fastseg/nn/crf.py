"""The fully connected CRF as a module (CRF-as-RNN-style: differentiable through its iterations)."""

from __future__ import annotations

from torch import Tensor, nn

from fastseg.ops import dense_crf

__all__ = ["DenseCRF"]


class DenseCRF(nn.Module):
    """:func:`fastseg.ops.dense_crf` with fixed parameters (pydensecrf's defaults; DeepLab v2 uses
    ``iterations=10, pos_sxy=1, pos_compat=3, bi_sxy=67, bi_srgb=3, bi_compat=4``).

    ``forward(unary [N, C, H, W], image [N, 3, H, W]) -> Q``; gradients flow to ``unary``.

    Example::

        >>> crf = DenseCRF(iterations=5)
        >>> q = crf(-logits.log_softmax(1), images)
    """

    def __init__(self, iterations: int = 5, pos_sxy: float = 3.0, pos_compat: float = 3.0, bi_sxy: float = 80.0,
                 bi_srgb: float = 13.0, bi_compat: float = 10.0) -> None:
        super().__init__()
        self.iterations = iterations
        self.pos_sxy, self.pos_compat = pos_sxy, pos_compat
        self.bi_sxy, self.bi_srgb, self.bi_compat = bi_sxy, bi_srgb, bi_compat

    def forward(self, unary: Tensor, image: Tensor) -> Tensor:
        return dense_crf(unary, image, iterations=self.iterations, pos_sxy=self.pos_sxy, pos_compat=self.pos_compat,
                         bi_sxy=self.bi_sxy, bi_srgb=self.bi_srgb, bi_compat=self.bi_compat)

    def extra_repr(self) -> str:
        return (f"iterations={self.iterations}, pos_sxy={self.pos_sxy}, pos_compat={self.pos_compat}, "
                f"bi_sxy={self.bi_sxy}, bi_srgb={self.bi_srgb}, bi_compat={self.bi_compat}")
