"""``roi_align`` / ``roi_upsample`` cases: AUNet mask-branch loads on an 800x1216 image (256 channels)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, register_op
from fastseg.ops import _reference

__all__ = ["roi_align_cases", "roi_upsample_cases"]

_ROI_IMAGE = (800, 1216)
_ROI_CHANNELS = 256


@dataclass(frozen=True)
class _RoiLoad:
    rois: int
    m: int  # side of each RoI's map
    stride: int  # the feature map is 1/stride of the image
    quick: bool = False

    @property
    def name(self) -> str:
        return f"aunet_r{self.rois}_m{self.m}_1/{self.stride}"

    @property
    def hw(self) -> tuple[int, int]:
        return _ROI_IMAGE[0] // self.stride, _ROI_IMAGE[1] // self.stride


_ROI_LOADS = tuple(_RoiLoad(k, m, s, quick=(k, m, s) == (100, 14, 8))
                   for s in (4, 8) for k in (100, 512) for m in (28, 14))
# Detectron2 / mmdet mask heads: aligned RoIs, adaptive sampling grid.
_ROI_KW: dict[str, Any] = {"sampling_ratio": -1, "aligned": True}


def _roi_inputs(load: _RoiLoad, batch: int, maps: bool) -> Callable[[torch.device, torch.dtype], Inputs]:
    """Proposal-like boxes (sides log-uniform in 32..512 px, centres uniform, clipped to the image) spread
    over ``batch`` images, plus the features [batch, 256, H, W] or the RoI maps [K, 256, m, m]."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(load.rois * 7 + load.m * 3 + load.stride)
        k = load.rois * batch
        img_h, img_w = _ROI_IMAGE
        side = torch.exp(torch.empty(k, 2).uniform_(math.log(32), math.log(512), generator=g))
        centre = torch.rand(k, 2, generator=g) * torch.tensor([img_w, img_h])
        lo = (centre - side / 2).clamp(min=0)
        hi = torch.minimum(centre + side / 2, torch.tensor([img_w - 1.0, img_h - 1.0]))
        idx = torch.arange(k).remainder(batch).unsqueeze(1).float()
        inputs: Inputs = {"rois": torch.cat([idx, lo, hi], 1).to(device=device, dtype=dtype)}
        if maps:
            inputs["maps"] = torch.randn(k, _ROI_CHANNELS, load.m, load.m, generator=g).to(device=device, dtype=dtype)
        else:
            inputs["features"] = torch.randn(batch, _ROI_CHANNELS, *load.hw, generator=g).to(device=device,
                                                                                             dtype=dtype)
        return inputs
    return make


def _roi_params(load: _RoiLoad, batch: int, baseline: str) -> dict[str, Any]:
    h, w = load.hw
    return {"layer": f"AUNet mask branch, {_ROI_IMAGE[0]}x{_ROI_IMAGE[1]} image", "N": batch, "C": _ROI_CHANNELS,
            "H": h, "W": w, "K": load.rois * batch, "m": load.m, "spatial_scale": 1 / load.stride,
            "shape": f"{load.rois * batch}x{_ROI_CHANNELS}x{load.m}x{load.m} <-> {batch}x{_ROI_CHANNELS}x{h}x{w}",
            "baseline": baseline, **_ROI_KW}


def _roi_bytes(load: _RoiLoad, batch: int) -> Callable[[Inputs], int]:
    def nbytes(inputs: Inputs) -> int:  # the map read once + the RoI maps written once (or the reverse)
        h, w = load.hw
        return (batch * h * w + load.rois * batch * load.m * load.m) * _ROI_CHANNELS * inputs["rois"].element_size()
    return nbytes


@register_op("roi_align")
def roi_align_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """RoIAlign of 100 / 512 proposals per image into 28² / 14² maps from 1/4 and 1/8 feature maps of an
    800x1216 image, against ``torchvision.ops.roi_align`` (forward)."""
    cases = []
    for load in _ROI_LOADS:
        scale = 1 / load.stride

        def baseline(i: Inputs, load: _RoiLoad = load, scale: float = scale) -> Tensor:
            return _reference.roi_align_torchvision(i["features"], i["rois"], load.m, spatial_scale=scale, **_ROI_KW)

        def run(i: Inputs, backend: str, load: _RoiLoad = load, scale: float = scale) -> Tensor:
            return ops.roi_align(i["features"], i["rois"], load.m, spatial_scale=scale, **_ROI_KW, backend=backend)

        cases.append(Case("roi_align", load.name, "fwd", _roi_params(load, batch, "torchvision.ops.roi_align"),
                          _roi_inputs(load, batch, False), baseline, run, _roi_bytes(load, batch), None, load.quick))
    return cases


@register_op("roi_upsample")
def roi_upsample_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """RoIUpsample of the same loads. ``adjoint`` against torchvision's roi_align backward kernel (the same
    function); ``aunet`` against the reference (on the 100-RoI loads: the dense reference is slow). On a
    GPU, ``adjoint`` also runs with ``torch.use_deterministic_algorithms(True)`` (the gather kernel)."""
    modes = ["adjoint", "aunet"] + (["adjoint_deterministic"] if torch.cuda.is_available() else [])
    cases = []
    for load in _ROI_LOADS:
        scale = 1 / load.stride
        shape = (batch, _ROI_CHANNELS, *load.hw)
        for mode in modes:
            if mode == "aunet" and load.rois > 100:
                continue
            op_mode = mode.removesuffix("_deterministic")

            def baseline(i: Inputs, shape: tuple[int, ...] = shape, scale: float = scale,
                         mode: str = op_mode) -> Tensor:
                if mode == "adjoint":
                    return _reference.roi_align_backward_torchvision(i["maps"], i["rois"], shape, spatial_scale=scale,
                                                                     **_ROI_KW)
                return _reference.roi_upsample(i["maps"], i["rois"], shape[2:], batch_size=shape[0],
                                               spatial_scale=scale, mode=mode, **_ROI_KW)

            def run(i: Inputs, backend: str, shape: tuple[int, ...] = shape, scale: float = scale,
                    mode: str = mode) -> Tensor:
                with _deterministic(mode.endswith("_deterministic")):
                    return ops.roi_upsample(i["maps"], i["rois"], shape[2:], batch_size=shape[0], spatial_scale=scale,
                                            mode=mode.removesuffix("_deterministic"), **_ROI_KW, backend=backend)

            base_name = "torchvision roi_align backward" if op_mode == "adjoint" else "_reference.roi_upsample"
            cases.append(Case("roi_upsample", f"{load.name}_{mode}", "fwd", _roi_params(load, batch, base_name),
                              _roi_inputs(load, batch, True), baseline, run, _roi_bytes(load, batch), None,
                              load.quick and mode != "aunet"))
    return cases


@contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(on) for the duration (restored after)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on or before)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
