"""``dynamic_mask_head`` cases: SOLOv2's test-time mask post-processing of one 800x1216 image (unified
mask features at stride 4: 200x304, E = 256) for 100 / 500 / 2000 candidates, fused
(``dynamic_mask_head`` + ``matrix_nms_packed`` + the kept soft masks recomputed from their kernels)
against mmdet's formulation (``_reference.solov2_postprocess``: n float masks, sigmoid, threshold, sums,
maskness, Matrix NMS of the float masks) in the same run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, register_op
from fastseg.ops import _reference

__all__ = ["dynamic_mask_head_cases", "solov2_postprocess_fused"]

_HW = (200, 304)
_E = 256
_CLASSES = 80
# mmdet's SOLOv2 test config (after the score threshold 0.1 that selects the candidates).
_NMS_KW: dict[str, Any] = {"kernel": "gaussian", "sigma": 2.0, "filter_thr": 0.05, "nms_pre": 500, "max_num": 100}


def solov2_postprocess_fused(kernels: Tensor, features: Tensor, labels: Tensor, scores: Tensor, strides: Tensor,
                             backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``_reference.solov2_postprocess`` on fastseg ops: packed masks into Matrix NMS, then only the kept
    soft masks computed again. Same outputs (scores, labels, keep_inds, soft masks [k, H, W])."""
    e, h, w = features.shape
    out = ops.dynamic_mask_head(kernels, features, strides=strides, score=scores, backend=backend)
    keep = out.keep.nonzero().squeeze(1)
    s, lab, inds = ops.matrix_nms_packed(out.masks[keep], h * w, labels[keep], out.scores[keep],
                                         mask_area=out.areas[keep], **_NMS_KW, backend=backend)
    keep_inds = keep[inds]
    soft = torch.sigmoid(kernels[keep_inds] @ features.reshape(e, h * w)).view(-1, h, w)
    return s, lab, keep_inds, soft


def _inputs(n: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    """SOLOv2-like candidates: ~n/8 objects (ellipses of 10..120 px radius); features = an orthonormal
    [E, objects] basis times each object's signed distance-like map (positive inside, ~ -6 far out) plus
    noise; every candidate's kernel is its object's basis vector, rescaled and perturbed (the grid cells
    around an object all predict it, slightly differently). Category scores in 0.1..1, strides 8..32."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(n * 7 + 1)
        h, w = _HW
        objects = max(n // 8, 1)
        yy, xx = torch.arange(h).view(1, h, 1).float(), torch.arange(w).view(1, 1, w).float()
        centre = torch.rand(objects, 2, generator=g) * torch.tensor([w, h])
        radius = torch.rand(objects, 2, generator=g) * 110 + 10
        d2 = ((xx - centre[:, 0, None, None]) / radius[:, 0, None, None]) ** 2 + \
            ((yy - centre[:, 1, None, None]) / radius[:, 1, None, None]) ** 2
        maps = (4 * (1 - d2)).clamp(min=-6).view(objects, h * w)
        basis = torch.linalg.qr(torch.randn(_E, max(objects, _E), generator=g))[0][:, :objects]  # [E, objects]
        features = basis @ maps + 0.05 * torch.randn(_E, h * w, generator=g)
        obj = torch.randint(0, objects, (n,), generator=g)
        kernels = basis.T[obj] * (1 + 0.2 * torch.rand(n, 1, generator=g)) + 0.02 * torch.randn(n, _E, generator=g)
        cls = torch.randint(0, _CLASSES, (objects,), generator=g)
        return {"kernels": kernels.to(device=device, dtype=dtype),
                "features": features.view(_E, h, w).to(device=device, dtype=dtype),
                "labels": cls[obj].to(device),
                "scores": (0.1 + 0.9 * torch.rand(n, generator=g)).to(device=device, dtype=dtype),
                "strides": torch.tensor([8.0, 8.0, 16.0, 32.0, 32.0])[torch.randint(0, 5, (n,), generator=g)].to(
                    device=device, dtype=dtype)}
    return make


def _flops(inputs: Inputs) -> float:
    n, e = inputs["kernels"].shape
    return 2.0 * n * e * inputs["features"][0].numel()


@register_op("dynamic_mask_head")
def dynamic_mask_head_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """SOLOv2 post-processing at 800x1216 for 100 / 500 / 2000 candidates: fused vs mmdet's formulation."""
    def baseline(i: Inputs) -> tuple[Tensor, ...]:
        return _reference.solov2_postprocess(i["kernels"], i["features"], i["labels"], i["scores"], i["strides"],
                                             **_NMS_KW)

    def run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
        return solov2_postprocess_fused(i["kernels"], i["features"], i["labels"], i["scores"], i["strides"],
                                        backend=backend)

    cases = []
    for n in (100, 500, 2000):
        params = {"layer": "SOLOv2 mask post-processing, 800x1216 image", "n": n, "E": _E, "H": _HW[0],
                  "W": _HW[1], "shape": f"{n}x{_E} . {_E}x{_HW[0]}x{_HW[1]}", **_NMS_KW}
        cases.append(Case("dynamic_mask_head", f"solov2_{n}", "fwd", params, _inputs(n), baseline, run, None,
                          _flops, quick=n == 100))
    return cases
