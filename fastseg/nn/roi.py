"""RoIAlign and AUNet's RoIUpsample as modules (torchvision.ops.RoIAlign's interface)."""

from __future__ import annotations

from torch import Tensor, nn

from fastseg.ops import roi_align, roi_upsample

__all__ = ["RoIAlign", "RoIUpsample"]


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
