"""RoIAlign and AUNet's RoIUpsample as modules (torchvision.ops.RoIAlign's interface), and an FPN
pooler with torchvision.ops.MultiScaleRoIAlign's interface on fastseg.ops.roi_align."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastseg.ops import roi_align, roi_upsample
from fastseg.ops._reference import rois_to_tensor

__all__ = ["MultiScaleRoIAlign", "RoIAlign", "RoIUpsample"]


class RoIAlign(nn.Module):
    """:func:`fastseg.ops.roi_align` with fixed arguments; a drop-in for ``torchvision.ops.RoIAlign``.

    Example::

        >>> pool = RoIAlign(14, spatial_scale=1 / 4, sampling_ratio=2, aligned=True)
        >>> pool(torch.randn(2, 256, 50, 76), [torch.tensor([[8.0, 8.0, 120.0, 90.0]]), torch.zeros(0, 4)]).shape
        torch.Size([1, 256, 14, 14])
    """

    def __init__(self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, features: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        return roi_align(features, rois, self.output_size, spatial_scale=self.spatial_scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class RoIUpsample(nn.Module):
    """AUNet's RoIUpsample (:func:`fastseg.ops.roi_upsample`): per-RoI maps back onto the feature map,
    on the sample grid of a :class:`RoIAlign` with the same arguments.

    ``forward(roi_maps [K, C, m, m], rois, output_size (H, W), batch_size=None) -> [N, C, H, W]``.

    Example::

        >>> up = RoIUpsample(spatial_scale=1 / 4, sampling_ratio=2, aligned=True)
        >>> up(torch.randn(1, 1, 14, 14), torch.tensor([[0.0, 8.0, 8.0, 120.0, 90.0]]), (50, 76)).shape
        torch.Size([1, 1, 50, 76])
    """

    def __init__(self, spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
                 mode: str = "aunet") -> None:
        super().__init__()
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode

    def forward(self, roi_maps: Tensor, rois: Tensor | list[Tensor], output_size: tuple[int, int],
                batch_size: int | None = None) -> Tensor:
        return roi_upsample(roi_maps, rois, output_size, batch_size=batch_size, spatial_scale=self.spatial_scale,
                            sampling_ratio=self.sampling_ratio, aligned=self.aligned, mode=self.mode)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, "
                f"aligned={self.aligned}, mode={self.mode!r})")


class MultiScaleRoIAlign(nn.Module):
    """FPN RoI pooling, a drop-in for ``torchvision.ops.MultiScaleRoIAlign`` (same arguments, same
    forward), pooling with :func:`fastseg.ops.roi_align` (``aligned=False``, as torchvision's).

    Each box goes to level ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6)``
    clamped to the given maps' levels (FPN paper, eq. 1); a level's scale is the power of two
    nearest to its size over the largest image size.

    ``forward(x: dict[str, Tensor [N, C, Hl, Wl]], boxes: list of [Li, 4], image_shapes: list of
    (H, W)) -> [sum Li, C, oh, ow]`` in the order of ``boxes``.

    Example::

        >>> pool = MultiScaleRoIAlign(["0", "1"], 7, sampling_ratio=2)
        >>> feats = {"0": torch.randn(1, 8, 64, 64), "1": torch.randn(1, 8, 32, 32)}
        >>> pool(feats, [torch.tensor([[4.0, 4.0, 100.0, 90.0]])], [(256, 256)]).shape
        torch.Size([1, 8, 7, 7])
    """

    def __init__(self, featmap_names: list[str], output_size: int | tuple[int, int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4) -> None:
        super().__init__()
        if not featmap_names:
            raise ValueError("featmap_names must name at least one feature map")
        self.featmap_names = list(featmap_names)
        self.output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    @staticmethod
    def _scale(feature: Tensor, image_size: tuple[int, int]) -> float:
        approx = feature.shape[-2] / image_size[0]
        return 2.0 ** round(math.log2(approx))

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = [x[name] for name in self.featmap_names]
        size = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        scales = [self._scale(f, size) for f in feats]
        rois = rois_to_tensor(list(boxes)) if len(boxes) else feats[0].new_zeros(0, 5)
        k, c = rois.shape[0], feats[0].shape[1]
        if len(feats) == 1:
            return roi_align(feats[0], rois, self.output_size, spatial_scale=scales[0],
                             sampling_ratio=self.sampling_ratio)
        lvl_min, lvl_max = -math.log2(scales[0]), -math.log2(scales[-1])
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(self.canonical_level + torch.log2(area.clamp(min=0).sqrt() / self.canonical_scale) + 1e-6)
        level = (level.clamp(lvl_min, lvl_max) - lvl_min).long()
        out = feats[0].new_zeros(k, c, *self.output_size)
        for i, (f, scale) in enumerate(zip(feats, scales, strict=True)):
            idx = torch.where(level == i)[0]
            if len(idx):
                out = out.index_copy(0, idx, roi_align(f, rois[idx], self.output_size, spatial_scale=scale,
                                                       sampling_ratio=self.sampling_ratio))
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")
