"""Matrix NMS (SOLOv2): mmdet's ``mask_matrix_nms`` semantics on bit-packed masks, batched, and for boxes.

The backends compute the O(n²) core, the decay factor of every kept mask (``fastseg::matrix_nms_decay``
on CPU and CUDA); sorting, filtering and top-k around it are shared (``_reference.matrix_nms_finish``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference

__all__ = ["matrix_nms", "matrix_nms_batched", "matrix_nms_boxes", "matrix_nms_packed"]

_KERNELS = ("gaussian", "linear")


def _check(items: Tensor, labels: Tensor, scores: Tensor, kernel: str, sigma: float, what: str) -> None:
    n = items.shape[0]
    if not isinstance(labels, Tensor) or labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must be a 1-D tensor of {n} labels (one per {what}), "
                         f"got {getattr(labels, 'shape', labels)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or len(scores) != n:
        raise ValueError(f"scores must be a 1-D tensor of {n} scores (one per {what}), "
                         f"got {getattr(scores, 'shape', scores)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if labels.device != items.device or scores.device != items.device:
        raise ValueError(f"labels ({labels.device}) and scores ({scores.device}) must be on the {what}s' device "
                         f"{items.device}")
    if n and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")


def _binary(masks: Tensor) -> Tensor:
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be [n, H, W], got {getattr(masks, 'shape', masks)}")
    if masks.dtype in (torch.bool, torch.uint8):
        return masks
    if not masks.is_floating_point():
        raise ValueError(f"masks must be bool, uint8 or floating point (thresholded at 0.5), got {masks.dtype}")
    return masks > 0.5


def _check_area(mask_area: Tensor | None, masks: Tensor) -> None:
    if mask_area is None:
        return
    if not isinstance(mask_area, Tensor) or mask_area.shape != (masks.shape[0],) or not mask_area.is_floating_point():
        raise ValueError(f"mask_area must be a floating [{masks.shape[0]}] tensor, got "
                         f"{getattr(mask_area, 'dtype', mask_area)} {getattr(mask_area, 'shape', '')}")
    if mask_area.device != masks.device:
        raise ValueError(f"mask_area is on {mask_area.device} but masks are on {masks.device}")


def _empty(scores: Tensor, labels: Tensor, items: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return scores[:0], labels[:0], items[:0], torch.zeros(0, dtype=torch.long, device=items.device)


def matrix_nms(masks: Tensor, labels: Tensor, scores: Tensor, *, kernel: str = "gaussian", sigma: float = 2.0,
               filter_thr: float = -1, nms_pre: int = -1, max_num: int = -1, mask_area: Tensor | None = None,
               backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SOLOv2's Matrix NMS with mmdet's ``mask_matrix_nms`` semantics.

    Masks are sorted by score (descending, ties by input index) and the first ``nms_pre`` kept; each mask
    j is decayed by the higher-scored masks i of its label: decay_j = min_i f(iou_ij) / f(comp_i), comp_i
    the largest IoU of mask i with a higher-scored mask of its label, f(x) = exp(-sigma·x²) (``gaussian``)
    or 1 - x (``linear``); scores below ``filter_thr`` (when > 0) are dropped, the rest sorted again and
    the first ``max_num`` (when > 0) returned. IoUs come from exact integer intersections; the decay is
    computed in float64 by every backend, so all return the same ``keep_inds``. Unlike mmdet, a pair of
    empty masks has IoU 0 and a fully suppressed duplicate (linear kernel) decays nothing (mmdet: 0/0).

    Args:
        masks: [n, H, W] bool or uint8 (float masks count where > 0.5).
        labels: [n] integer class of each mask.
        scores: [n] floating scores.
        mask_area: [n] areas to use instead of the masks' pixel counts.

    Returns:
        (scores, labels, masks, keep_inds): the kept masks by decayed score, descending; keep_inds index
        the inputs.

    Example::

        >>> masks = torch.rand(500, 200, 304) > 0.7
        >>> scores, labels, kept, keep_inds = matrix_nms(masks, torch.randint(0, 80, (500,)), torch.rand(500),
        ...                                              filter_thr=0.05, max_num=100)
    """
    binary = _binary(masks)
    _check(masks, labels, scores, kernel, sigma, "mask")
    _check_area(mask_area, masks)
    if masks.shape[0] == 0:
        return _empty(scores, labels, masks)
    order = _reference.score_order(scores, nms_pre)
    impl = _backend.resolve("matrix_nms", masks.device, backend)
    decay = impl(binary, labels, order, mask_area, kernel, float(sigma))
    return _reference.matrix_nms_finish(scores, labels, masks, order, decay, filter_thr, max_num)


def matrix_nms_batched(masks: list[Tensor], labels: list[Tensor], scores: list[Tensor], *, kernel: str = "gaussian",
                       sigma: float = 2.0, filter_thr: float = -1, nms_pre: int = -1, max_num: int = -1,
                       mask_area: list[Tensor] | None = None,
                       backend: str | None = None) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """:func:`matrix_nms` of every image of a batch (lists of per-image tensors), equal to calling it per
    image. On a GPU, images whose masks share H×W run as one call of the backend (one launch; the masks
    are concatenated): labels are made unique per image, and pairs of different labels never interact."""
    if not (len(masks) == len(labels) == len(scores) and (mask_area is None or len(mask_area) == len(masks))):
        raise ValueError(f"masks, labels, scores (and mask_area) must be lists of the same length, got "
                         f"{len(masks)}, {len(labels)}, {len(scores)}"
                         + ("" if mask_area is None else f", {len(mask_area)}"))
    if mask_area is not None and any(a is None for a in mask_area):
        raise ValueError("mask_area must be None or a list of [n_i] tensors, one per image")
    areas = mask_area if mask_area is not None else [None] * len(masks)
    binaries = []
    for m, lab, s, a in zip(masks, labels, scores, areas, strict=True):
        binaries.append(_binary(m))
        _check(m, lab, s, kernel, sigma, "mask")
        _check_area(a, m)
    # One backend call for the batch where that saves launches (a GPU) and the masks share H×W; on CPU,
    # per-image calls spare the concatenated copy of the masks.
    one_call = len({(b.shape[1:], b.device, b.dtype) for b in binaries}) == 1 and binaries[0].device.type != "cpu"
    if not one_call:
        return [matrix_nms(m, lab, s, kernel=kernel, sigma=sigma, filter_thr=filter_thr, nms_pre=nms_pre,
                           max_num=max_num, mask_area=a, backend=backend)
                for m, lab, s, a in zip(masks, labels, scores, areas, strict=True)]
    return _batched_one_call(binaries, masks, labels, scores, mask_area, kernel, float(sigma), filter_thr, nms_pre,
                             max_num, backend)


def _batched_one_call(binaries, masks, labels, scores, mask_area, kernel, sigma, filter_thr, nms_pre, max_num,
                      backend):
    """The batch as one backend call: masks concatenated, labels made unique per image."""
    count = len(masks)
    orders = [_reference.score_order(s, nms_pre) for s in scores]
    offsets = [0]
    for m in masks:
        offsets.append(offsets[-1] + m.shape[0])
    # label * count + image: unique per (image, label) without reading the labels (no device sync).
    all_labels = torch.cat([lab.long() * count + i for i, lab in enumerate(labels)])
    all_order = torch.cat([o + off for o, off in zip(orders, offsets, strict=False)])
    all_area = torch.cat([a.double() for a in mask_area]) if mask_area is not None else None
    impl = _backend.resolve("matrix_nms", binaries[0].device, backend)
    decay = impl(torch.cat(binaries), all_labels, all_order, all_area, kernel, sigma)
    decays = decay.split([len(o) for o in orders])
    return [_reference.matrix_nms_finish(s, lab, m, o, d, filter_thr, max_num) if m.shape[0] else _empty(s, lab, m)
            for m, lab, s, o, d in zip(masks, labels, scores, orders, decays, strict=True)]


def matrix_nms_boxes(boxes: Tensor, labels: Tensor, scores: Tensor, *, kernel: str = "gaussian", sigma: float = 2.0,
                     filter_thr: float = -1, nms_pre: int = -1, max_num: int = -1,
                     backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Matrix NMS of boxes [n, 4] (x1, y1, x2, y2) — the PP-YOLO / Paddle variant: :func:`matrix_nms` with
    box IoU (torchvision's ``box_iou``) instead of mask IoU. Returns (scores, labels, boxes, keep_inds)."""
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"boxes must be a floating [n, 4] tensor, got {getattr(boxes, 'shape', boxes)}")
    _check(boxes, labels, scores, kernel, sigma, "box")
    if boxes.shape[0] == 0:
        return _empty(scores, labels, boxes)
    order = _reference.score_order(scores, nms_pre)
    impl = _backend.resolve("matrix_nms_boxes", boxes.device, backend)
    decay = impl(boxes, labels, order, kernel, float(sigma))
    return _reference.matrix_nms_finish(scores, labels, boxes, order, decay, filter_thr, max_num)


def matrix_nms_packed(masks: Tensor, num_pixels: int, labels: Tensor, scores: Tensor, *, mask_area: Tensor,
                      kernel: str = "gaussian", sigma: float = 2.0, filter_thr: float = -1, nms_pre: int = -1,
                      max_num: int = -1, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`matrix_nms` of bit-packed binary masks, as :func:`fastseg.ops.dynamic_mask_head` returns them.

    Same semantics (sorting, ``nms_pre``, decay, ``filter_thr``, ``max_num``) and the same ``keep_inds``
    as ``matrix_nms`` on the unpacked masks with the same ``mask_area``; the masks are never unpacked by
    the cpu and cuda backends (intersections are AND + popcount of the words). No masks are returned:
    the caller indexes (or recomputes) what it needs with ``keep_inds``.

    Args:
        masks: int64 [n, ceil(num_pixels/64)]: bit b of word w is pixel 64·w + b; bits past num_pixels 0.
        num_pixels: H·W of the masks.
        labels: [n] integer class of each mask.
        scores: [n] floating scores.
        mask_area: [n] floating areas (the pixel counts; ``dynamic_mask_head`` returns them).

    Returns:
        (scores, labels, keep_inds): the kept masks by decayed score, descending; keep_inds index the inputs.

    Example::

        >>> out = dynamic_mask_head(kernels, features)  # kernels [500, 256], features [256, 200, 304]
        >>> scores, labels, keep_inds = matrix_nms_packed(out.masks, 200 * 304, cate_labels, out.scores,
        ...                                               mask_area=out.areas, filter_thr=0.05, max_num=100)
    """
    if not isinstance(num_pixels, int) or isinstance(num_pixels, bool) or num_pixels < 0:
        raise ValueError(f"num_pixels must be an int >= 0, got {num_pixels!r}")
    words = (num_pixels + 63) // 64
    if not isinstance(masks, Tensor) or masks.dim() != 2 or masks.dtype != torch.int64 or masks.shape[1] != words:
        raise ValueError(f"masks must be int64 [n, {words}] (bit-packed, {num_pixels} pixels), got "
                         f"{getattr(masks, 'dtype', masks)} {getattr(masks, 'shape', '')}")
    _check(masks, labels, scores, kernel, sigma, "mask")
    if mask_area is None:
        raise ValueError("mask_area is required for packed masks (dynamic_mask_head returns it as areas)")
    _check_area(mask_area, masks)
    if masks.shape[0] == 0:
        s, lab, _, keep = _empty(scores, labels, masks)
        return s, lab, keep
    order = _reference.score_order(scores, nms_pre)
    impl = _backend.resolve("matrix_nms_packed", masks.device, backend)
    decay = impl(masks, labels, order, mask_area, kernel, float(sigma))
    s, lab, _, keep = _reference.matrix_nms_finish(scores, labels, masks, order, decay, filter_thr, max_num)
    return s, lab, keep


def _compiled_masks(*args):
    return torch.ops.fastseg.matrix_nms_decay(*args)


def _compiled_boxes(*args):
    return torch.ops.fastseg.matrix_nms_boxes_decay(*args)


def _compiled_packed(*args):
    return torch.ops.fastseg.matrix_nms_packed_decay(*args)


def _triton_packed(*args):
    from fastseg.triton_kernels import matrix_nms as tk

    return tk.matrix_nms_packed_decay(*args)


def _triton_masks(*args):
    from fastseg.triton_kernels import matrix_nms as tk

    return tk.matrix_nms_decay(*args)


_backend.register("matrix_nms", "reference", _reference.matrix_nms_decay)
_backend.register("matrix_nms", "cpu", _compiled_masks, kernel="fastseg::matrix_nms_decay")
_backend.register("matrix_nms", "cuda", _compiled_masks, kernel="fastseg::matrix_nms_decay")
_backend.register("matrix_nms", "triton", _triton_masks)
_backend.register("matrix_nms_packed", "reference", _reference.matrix_nms_packed_decay)
_backend.register("matrix_nms_packed", "cpu", _compiled_packed, kernel="fastseg::matrix_nms_packed_decay")
_backend.register("matrix_nms_packed", "cuda", _compiled_packed, kernel="fastseg::matrix_nms_packed_decay")
_backend.register("matrix_nms_packed", "triton", _triton_packed)
_backend.register("matrix_nms_boxes", "reference", _reference.matrix_nms_boxes_decay)
_backend.register("matrix_nms_boxes", "cpu", _compiled_boxes, kernel="fastseg::matrix_nms_boxes_decay")
_backend.register("matrix_nms_boxes", "cuda", _compiled_boxes, kernel="fastseg::matrix_nms_boxes_decay")
# Measured on CPU (bench/results/): the bit-packed kernel beats the float formulation. The CUDA order is
# provisional until a GPU run of bench/gpu_check.sh is recorded.
_backend.set_preference("matrix_nms", {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
_backend.set_preference("matrix_nms_packed", {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
_backend.set_preference("matrix_nms_boxes", {"cpu": ("cpu", "reference"), "cuda": ("cuda", "reference")})
