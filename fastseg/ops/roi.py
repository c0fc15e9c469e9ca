"""RoIAlign and AUNet's RoIUpsample on one shared sample grid."""

from __future__ import annotations

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference
from fastseg.ops._reference import rois_to_tensor

__all__ = ["roi_align", "roi_upsample"]

_MODES = ("adjoint", "aunet")


def _pair(name: str, size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {size!r}")
    return pair


def geometry_dtype(data_dtype: torch.dtype) -> torch.dtype:
    """The dtype RoI coordinates are read in for data of ``data_dtype``: float64 for float64 data,
    else float32 (never float16/bfloat16, which would move box edges by up to 4 px at x ~ 1000)."""
    return torch.float64 if data_dtype == torch.float64 else torch.float32


def _check_rois(rois: Tensor | list[Tensor], like: Tensor, batch_size: int | None) -> Tensor:
    if isinstance(rois, (list, tuple)):
        for i, b in enumerate(rois):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"rois[{i}] must be a [L, 4] tensor of boxes, got {getattr(b, 'shape', b)}")
        rois = rois_to_tensor(rois) if rois else like.new_zeros(0, 5)
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must be [K, 5] (batch_idx, x1, y1, x2, y2) or a list of [L, 4], "
                         f"got {getattr(rois, 'shape', rois)}")
    if rois.device != like.device:
        raise ValueError(f"rois is on {rois.device} but the maps are on {like.device}")
    if not rois.is_floating_point():
        raise ValueError(f"rois must be floating point, got {rois.dtype}")
    # Value checks read the data: skipped while torch.compile traces (the C++ CPU ops repeat them).
    if not len(rois) or torch.compiler.is_compiling():
        return rois.to(geometry_dtype(like.dtype))
    bad = ~torch.isfinite(rois).all(1)
    if batch_size is not None:
        idx = rois[:, 0]
        bad |= (idx < 0) | (idx >= batch_size) | (idx != idx.round())
    if bool(bad.any()):  # the only read of the data (a synchronisation on a GPU); diagnose after
        if not bool(torch.isfinite(rois).all()):
            raise ValueError("rois must be finite, got NaN or inf coordinates")
        raise ValueError(f"rois batch indices must be integers in [0, {batch_size}), got "
                         f"{idx.min().item()}..{idx.max().item()}")
    return rois.to(geometry_dtype(like.dtype))


def roi_align(features: Tensor, rois: Tensor | list[Tensor], output_size: int | tuple[int, int], *,
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False,
              backend: str | None = None) -> Tensor:
    """Exactly ``torchvision.ops.roi_align``.

    Args:
        features: [N, C, H, W].
        rois: [K, 5] (batch_idx, x1, y1, x2, y2) or a list of N [Li, 4] boxes, any floating dtype:
            read in float32 (float64 for float64 features), also for float16/bfloat16 features, whose
            result stays in their dtype (torchvision's autocast policy).
        output_size: (ph, pw) or an int.
        spatial_scale: maps box coordinates onto the feature map.
        sampling_ratio: samples per bin and axis; <= 0 is adaptive (ceil(roi / output)).
        aligned: shift by half a pixel (no size clamp) as Detectron2's ROIAlignV2.

    Returns:
        [K, C, ph, pw].

    Example::

        >>> feats = torch.randn(2, 256, 50, 76)
        >>> boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0]]), torch.tensor([[0.0, 0.0, 75.0, 49.0]])]
        >>> roi_align(feats, boxes, 14, aligned=True).shape
        torch.Size([2, 256, 14, 14])
    """
    if not isinstance(features, Tensor) or features.dim() != 4 or not features.is_floating_point():
        raise ValueError(f"features must be a floating [N, C, H, W] tensor, got {getattr(features, 'shape', features)}")
    if features.shape[2] == 0 or features.shape[3] == 0:
        raise ValueError(f"features must have H, W > 0, got shape {tuple(features.shape)}")
    rois = _check_rois(rois, features, features.shape[0])
    ph, pw = _pair("output_size", output_size)
    impl = _backend.resolve("roi_align", features.device, backend)
    return impl(features, rois, ph, pw, float(spatial_scale), int(sampling_ratio), bool(aligned))


def roi_upsample(roi_maps: Tensor, rois: Tensor | list[Tensor], output_size: tuple[int, int], *,
                 batch_size: int | None = None, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False, mode: str = "aunet", backend: str | None = None) -> Tensor:
    """AUNet's RoIUpsample: per-RoI maps back onto the feature map, on RoIAlign's sample grid.

    ``mode="adjoint"`` is the exact transpose of :func:`roi_align` with the same arguments (its input
    gradient); ``mode="aunet"`` renormalises each sample's four bilinear weights by 1/Σw² and does
    not divide by the sample count, so re-sampling at a sample point returns its value. Overlapping
    RoIs sum. The backward of each mode is the exact adjoint of its forward.

    Args:
        roi_maps: [K, C, m, m'] (e.g. 14×14 or 28×28 mask-branch maps).
        rois: [K, 5] or a list of [Li, 4] boxes (image coordinates), any floating dtype: read in float32
            (float64 for float64 maps), the result in roi_maps' dtype.
        output_size: (H, W) of the feature map.
        batch_size: N; default 1 + the largest batch index (0 when there are no RoIs).

    Returns:
        [N, C, H, W].
    """
    if not isinstance(roi_maps, Tensor) or roi_maps.dim() != 4 or not roi_maps.is_floating_point():
        raise ValueError(f"roi_maps must be a floating [K, C, m, m] tensor, got {getattr(roi_maps, 'shape', roi_maps)}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    height, width = _pair("output_size", output_size)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 0):
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    rois = _check_rois(rois, roi_maps, batch_size)
    if rois.shape[0] != roi_maps.shape[0]:
        raise ValueError(f"roi_maps has {roi_maps.shape[0]} maps but rois has {rois.shape[0]} boxes")
    if batch_size is None:
        batch_size = int(rois[:, 0].max()) + 1 if len(rois) else 0
    impl = _backend.resolve("roi_upsample", roi_maps.device, backend)
    return impl(roi_maps, rois, batch_size, height, width, float(spatial_scale), int(sampling_ratio),
                bool(aligned), mode)


def _roi_align_reference(features, rois, ph, pw, spatial_scale, sampling_ratio, aligned):
    return _reference.roi_align(features, rois, (ph, pw), spatial_scale=spatial_scale,
                                sampling_ratio=sampling_ratio, aligned=aligned)


def _roi_upsample_reference(roi_maps, rois, batch_size, height, width, spatial_scale, sampling_ratio, aligned,
                            mode):
    return _reference.roi_upsample(roi_maps, rois, (height, width), batch_size=batch_size,
                                   spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned,
                                   mode=mode)


def _roi_align_compiled(*args):
    return torch.ops.fastseg.roi_align(*args)


def _roi_upsample_compiled(*args):
    return torch.ops.fastseg.roi_upsample(*args)


def _roi_align_triton(*args):
    from fastseg.triton_kernels import roi_align as tk

    return tk.roi_align(*args)


def _roi_upsample_triton(*args):
    from fastseg.triton_kernels import roi_align as tk

    return tk.roi_upsample(*args)


for _op, _reference_impl, _compiled_impl, _triton_impl in (
        ("roi_align", _roi_align_reference, _roi_align_compiled, _roi_align_triton),
        ("roi_upsample", _roi_upsample_reference, _roi_upsample_compiled, _roi_upsample_triton)):
    _backend.register(_op, "reference", _reference_impl)
    _backend.register(_op, "cpu", _compiled_impl, kernel=f"fastseg::{_op}")
    _backend.register(_op, "cuda", _compiled_impl, kernel=f"fastseg::{_op}")
    _backend.register(_op, "triton", _triton_impl)
    # Measured on CPU (bench/results/): the C++ kernels beat the reference. The CUDA order is
    # provisional until a GPU run of bench/gpu_check.sh is recorded.
    _backend.set_preference(_op, {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
