"""fastseg.nn.RoIAlign / RoIUpsample: the ops with fixed arguments, torchvision's module interface."""

from __future__ import annotations

import torch
import torchvision

from fastseg import nn as fnn
from fastseg import ops


def test_roi_align_module_matches_torchvision_module():
    torch.manual_seed(0)
    feats = torch.randn(2, 5, 23, 29, dtype=torch.float64)
    boxes = [torch.tensor([[3.0, 4.0, 60.0, 40.0]], dtype=torch.float64),
             torch.tensor([[0.0, 0.0, 90.0, 70.0], [10.0, 12.0, 11.0, 30.0]], dtype=torch.float64)]
    ours = fnn.RoIAlign((7, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    theirs = torchvision.ops.RoIAlign((7, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(ours(feats, boxes), theirs(feats, boxes))
    assert repr(ours) == "RoIAlign(output_size=(7, 5), spatial_scale=0.25, sampling_ratio=2, aligned=True)"


def test_roi_upsample_module_is_the_op():
    torch.manual_seed(1)
    maps = torch.randn(3, 4, 14, 14, dtype=torch.float64)
    rois = torch.tensor([[0.0, 3, 4, 60, 40], [1.0, 0, 0, 90, 70], [1.0, 10, 12, 11, 30]], dtype=torch.float64)
    for mode in ("aunet", "adjoint"):
        up = fnn.RoIUpsample(spatial_scale=0.25, sampling_ratio=-1, aligned=False, mode=mode)
        want = ops.roi_upsample(maps, rois, (23, 29), batch_size=3, spatial_scale=0.25, mode=mode)
        torch.testing.assert_close(up(maps, rois, (23, 29), batch_size=3), want)
    assert repr(up) == "RoIUpsample(spatial_scale=0.25, sampling_ratio=-1, aligned=False, mode='adjoint')"


def test_aunet_upsample_then_align_returns_the_maps():
    """AUNet's normalisation: bilinear re-sampling at a sample point returns the value put there. With
    one sample per bin (sampling_ratio=1, so RoIAlign is plain bilinear sampling) and bins 3 pixels
    apart (no two samples share a pixel), RoIAlign ∘ RoIUpsample(aunet) is the identity."""
    torch.manual_seed(2)
    rois = torch.tensor([[0.0, 4.3, 5.6, 25.3, 26.6], [1.0, 1.1, 2.7, 22.1, 23.7]], dtype=torch.float64)
    maps = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    up = fnn.RoIUpsample(sampling_ratio=1)(maps, rois, (31, 37))
    torch.testing.assert_close(fnn.RoIAlign(7, sampling_ratio=1)(up, rois), maps)
    adjoint = fnn.RoIUpsample(sampling_ratio=1, mode="adjoint")(maps, rois, (31, 37))
    assert not torch.allclose(fnn.RoIAlign(7, sampling_ratio=1)(adjoint, rois), maps)  # the plain transpose is not
