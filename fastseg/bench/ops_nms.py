"""``matrix_nms`` / ``matrix_nms_boxes`` cases: SOLOv2 test-time masks at 1/4 of an 800x1216 image;
PP-YOLO boxes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastseg import ops
from fastseg.bench.cases import Case, Inputs, register_op
from fastseg.ops import _reference

__all__ = ["matrix_nms_boxes_cases", "matrix_nms_cases"]

_NMS_HW = (200, 304)
_NMS_CLASSES = 80
_NMS_KW: dict[str, Any] = {"kernel": "gaussian", "sigma": 2.0, "filter_thr": 0.05, "max_num": 100}


def _nms_inputs(n: int, batch: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    """SOLOv2-like predictions: ~n/10 objects (ellipses of 10..120 px radius, one class each); every mask
    is its object's ellipse shifted by a few pixels and rescaled (the grid cells around an object all
    predict it), 10% of them with another label. Several images go in as lists (``batch`` > 1)."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(n * 13 + batch)
        h, w = _NMS_HW
        yy, xx = torch.arange(h).view(1, h, 1).float(), torch.arange(w).view(1, 1, w).float()
        images: dict[str, list[Tensor]] = {"masks": [], "labels": [], "scores": []}
        for _ in range(batch):
            objects = max(n // 10, 1)
            centre = torch.rand(objects, 2, generator=g) * torch.tensor([w, h])
            radius = torch.rand(objects, 2, generator=g) * 110 + 10
            cls = torch.randint(0, _NMS_CLASSES, (objects,), generator=g)
            obj = torch.randint(0, objects, (n,), generator=g)
            c = centre[obj] + torch.randn(n, 2, generator=g) * 4
            r = radius[obj] * (1 + 0.15 * torch.randn(n, 1, generator=g))
            inside = ((xx - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + \
                ((yy - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
            flip = torch.rand(n, generator=g) < 0.1
            labels = torch.where(flip, torch.randint(0, _NMS_CLASSES, (n,), generator=g), cls[obj])
            images["masks"].append((inside <= 1).to(device))
            images["labels"].append(labels.to(device))
            images["scores"].append(torch.rand(n, generator=g).to(device=device, dtype=dtype))
        if batch == 1:
            return {k: v[0] for k, v in images.items()}
        return images  # type: ignore[return-value]
    return make


def _nms_bytes(inputs: Inputs) -> int:
    masks = inputs["masks"]
    return sum(m.numel() for m in masks) if isinstance(masks, list) else masks.numel()


@register_op("matrix_nms")
def matrix_nms_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """SOLOv2 Matrix NMS of 100 / 500 / 2000 masks of 200x304 (1/4 of 800x1216), 80 classes, gaussian
    kernel, filter 0.05, top 100, against the float-matmul formulation (mmdet's); plus a batch of 8
    images of 500 masks through ``matrix_nms_batched`` (one backend call) against per-image calls."""
    cases = []
    for n in (100, 500, 2000):
        def baseline(i: Inputs) -> tuple[Tensor, ...]:
            return _reference.matrix_nms(i["masks"], i["labels"], i["scores"], **_NMS_KW)

        def run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
            return ops.matrix_nms(i["masks"], i["labels"], i["scores"], **_NMS_KW, backend=backend)

        params = {"layer": "SOLOv2 test-time NMS, 800x1216 image", "n": n, "H": _NMS_HW[0], "W": _NMS_HW[1],
                  "classes": _NMS_CLASSES, "shape": f"{n}x{_NMS_HW[0]}x{_NMS_HW[1]}", **_NMS_KW}
        cases.append(Case("matrix_nms", f"solov2_{n}", "fwd", params, _nms_inputs(n, 1), baseline, run, _nms_bytes,
                          None, quick=n == 100))

    def batch_baseline(i: Inputs) -> tuple[Tensor, ...]:
        outs = [_reference.matrix_nms(m, lab, s, **_NMS_KW) for m, lab, s in zip(i["masks"], i["labels"], i["scores"],
                                                                                   strict=True)]
        return tuple(torch.cat([o[k] for o in outs]) for k in range(4))

    def batch_run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
        outs = ops.matrix_nms_batched(i["masks"], i["labels"], i["scores"], **_NMS_KW, backend=backend)
        return tuple(torch.cat([o[k] for o in outs]) for k in range(4))

    params = {"layer": "SOLOv2 test-time NMS, batch of 8", "n": 500, "N": 8, "H": _NMS_HW[0], "W": _NMS_HW[1],
              "classes": _NMS_CLASSES, "shape": f"8x500x{_NMS_HW[0]}x{_NMS_HW[1]}", **_NMS_KW}
    cases.append(Case("matrix_nms", "solov2_500_batch8", "fwd", params, _nms_inputs(500, 8), batch_baseline,
                      batch_run, _nms_bytes, None))
    return cases


def _box_inputs(n: int) -> Callable[[torch.device, torch.dtype], Inputs]:
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(n)
        centre = torch.rand(n, 2, generator=g) * torch.tensor([1216.0, 800.0])
        size = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(600), generator=g))
        boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
        return {"boxes": boxes.to(device=device, dtype=dtype),
                "labels": torch.randint(0, _NMS_CLASSES, (n,), generator=g).to(device),
                "scores": torch.rand(n, generator=g).to(device=device, dtype=dtype)}
    return make


@register_op("matrix_nms_boxes")
def matrix_nms_boxes_cases(batch: int = 1, quick: bool = False) -> list[Case]:
    """PP-YOLO's box Matrix NMS (nms_top_k 1000, keep_top_k 100, 80 classes) against Paddle-style
    per-class loops in PyTorch."""
    kw = {**_NMS_KW, "nms_pre": 1000}

    def baseline(i: Inputs) -> tuple[Tensor, ...]:
        return _reference.matrix_nms_boxes(i["boxes"], i["labels"], i["scores"], **kw)

    def run(i: Inputs, backend: str) -> tuple[Tensor, ...]:
        return ops.matrix_nms_boxes(i["boxes"], i["labels"], i["scores"], **kw, backend=backend)

    return [Case("matrix_nms_boxes", f"ppyolo_{n}" + ("_top1000" if n > 1000 else ""), "fwd",
                 {"layer": "PP-YOLO box NMS", "n": n, "classes": _NMS_CLASSES, "shape": f"{n}x4", **kw},
                 _box_inputs(n), baseline, run, None, None, quick=n == 1000) for n in (1000, 4000)]
