"""SOLOv2's dynamic mask head: the n candidate masks of an image from their dynamic 1×1 kernels, fused.

mmdet computes ``sigmoid(kernels @ features)`` as n float masks [n, H, W], thresholds them, sums them twice
(area, maskness) and hands float copies to Matrix NMS. The fused backends compute the product tile by tile
and keep only what the post-processing reads: the bit-packed binary masks (the packing Matrix NMS uses:
pass them to :func:`fastseg.ops.matrix_nms_packed`), the areas and the maskness. The soft masks of the few
instances that survive NMS are recomputed from their kernels (a [k, E] × [E, H·W] product).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference

__all__ = ["DynamicMasks", "dynamic_mask_head", "unpack_masks"]


class DynamicMasks(NamedTuple):
    """Result of :func:`dynamic_mask_head` for n candidates of an H×W image.

    masks: int64 [n, ceil(H·W/64)], bit-packed binary masks: bit b of word w is pixel 64·w + b of the
        row-major H·W image (bits past H·W are 0).
    areas: float32 [n], pixel counts of the masks.
    maskness: [n] (the inputs' dtype), mean probability over each mask's pixels; 0 for an empty mask.
    scores: [n], ``score * maskness`` (or the maskness when no score was given).
    keep: bool [n], ``areas > strides`` (all True when no strides were given).
    """

    masks: Tensor
    areas: Tensor
    maskness: Tensor
    scores: Tensor
    keep: Tensor


def _check_vector(name: str, t: Tensor | None, n: int, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} values (one per kernel), got "
                         f"{getattr(t, 'shape', t)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be a real tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but kernels are on {device}")


def _check(kernels: Tensor, features: Tensor, mask_thr: float) -> None:
    if not isinstance(kernels, Tensor) or kernels.dim() != 2 or not kernels.is_floating_point():
        raise ValueError(f"kernels must be a floating [n, E] tensor, got "
                         f"{getattr(kernels, 'dtype', kernels)} {getattr(kernels, 'shape', '')}")
    if not isinstance(features, Tensor) or features.dim() != 3 or not features.is_floating_point():
        raise ValueError(f"features must be a floating [E, H, W] tensor (one image), got "
                         f"{getattr(features, 'dtype', features)} {getattr(features, 'shape', '')}")
    if features.shape[0] != kernels.shape[1]:
        raise ValueError(f"kernels [n, E] and features [E, H, W] disagree on E: kernels {tuple(kernels.shape)}, "
                         f"features {tuple(features.shape)}")
    if features.dtype != kernels.dtype:
        raise ValueError(f"features ({features.dtype}) and kernels ({kernels.dtype}) must have the same dtype")
    if features.device != kernels.device:
        raise ValueError(f"features are on {features.device} but kernels are on {kernels.device}")
    if not isinstance(mask_thr, (int, float)) or isinstance(mask_thr, bool) or not math.isfinite(mask_thr):
        raise ValueError(f"mask_thr must be a finite number, got {mask_thr!r}")


def dynamic_mask_head(kernels: Tensor, features: Tensor, *, mask_thr: float = 0.5, strides: Tensor | None = None,
                      score: Tensor | None = None, backend: str | None = None) -> DynamicMasks:
    """SOLOv2's dynamic mask prediction and mask rescoring, without writing the n float masks.

    prob = sigmoid(kernels @ features) per pixel; a pixel is in the mask when prob > mask_thr, strictly (a
    pixel exactly at the threshold is out, as in mmdet's ``mask_preds > mask_thr``; a zero logit at 0.5
    is out). The fused backends (cpu, cuda, triton) accumulate the logits in float32 (float64 for float64
    inputs; float16/bfloat16 operands are exact in float32) and decide on the logit: logit >
    logit(mask_thr), the threshold rounded toward -inf to the accumulation type, which is the exact
    comparison — the same decision on every fused backend for the same logit. The ``reference`` backend
    is mmdet's formulation in the inputs' dtype. Near the threshold the backends may therefore differ in
    pixels whose probability is within rounding of mask_thr (what the tests allow, no more). The maskness
    is the mean of sigmoid over the mask's pixels, summed in float32 (float64) per tile and then over
    the tiles in a fixed order (deterministic, independent of the thread count).
    Inference only: not differentiable (the outputs never require grad).

    Args:
        kernels: [n, E] floating, the predicted dynamic 1×1 conv weights of the n candidates.
        features: [E, H, W], the unified mask features of one image; same dtype and device as kernels.
        mask_thr: threshold on the probability.
        strides: optional [n] (any real dtype): a mask is kept only if its area > its stride (SOLOv2's
            small-mask filter).
        score: optional [n] floating category scores, multiplied by the maskness.

    Returns:
        :class:`DynamicMasks` (masks, areas, maskness, scores, keep).

    Example::

        >>> # kernels [500, 256], features [256, 200, 304]
        >>> out = dynamic_mask_head(kernels, features, strides=strides, score=cate_scores)
        >>> k = out.keep
        >>> scores, labels, keep_inds = matrix_nms_packed(out.masks[k], 200 * 304, labels[k], out.scores[k],
        ...                                               mask_area=out.areas[k], max_num=100)
    """
    _check(kernels, features, mask_thr)
    n = kernels.shape[0]
    _check_vector("strides", strides, n, kernels.device)
    _check_vector("score", score, n, kernels.device)
    if score is not None and not score.is_floating_point():
        raise ValueError(f"score must be floating point, got {score.dtype}")
    impl = _backend.resolve("dynamic_mask_head", kernels.device, backend)
    masks, areas, maskness = impl(kernels.detach(), features.detach(), float(mask_thr))
    scores = maskness if score is None else score.detach() * maskness
    keep = torch.ones(n, dtype=torch.bool, device=kernels.device) if strides is None else areas > strides
    return DynamicMasks(masks, areas, maskness, scores, keep)


def unpack_masks(masks: Tensor, height: int, width: int) -> Tensor:
    """Bit-packed masks int64 [n, ceil(H·W/64)] (as :func:`dynamic_mask_head` returns them) -> bool [n, H, W].

    Example::

        >>> binary = unpack_masks(dynamic_mask_head(kernels, features).masks, 200, 304)
    """
    words = (height * width + 63) // 64
    if not isinstance(masks, Tensor) or masks.dim() != 2 or masks.dtype != torch.int64 or masks.shape[1] != words:
        raise ValueError(f"masks must be int64 [n, {words}] (bit-packed {height}x{width} masks), got "
                         f"{getattr(masks, 'dtype', masks)} {getattr(masks, 'shape', '')}")
    return _reference.unpack_bits(masks, height * width).view(-1, height, width)


def _compiled(kernels: Tensor, features: Tensor, mask_thr: float):
    return torch.ops.fastseg.dynamic_mask_head(kernels, features, mask_thr)


def _triton(kernels: Tensor, features: Tensor, mask_thr: float):
    from fastseg.triton_kernels import dynamic_mask_head as tk

    return tk.dynamic_mask_head(kernels, features, mask_thr)


_backend.register("dynamic_mask_head", "reference", _reference.dynamic_mask_head)
_backend.register("dynamic_mask_head", "cpu", _compiled, kernel="fastseg::dynamic_mask_head")
_backend.register("dynamic_mask_head", "cuda", _compiled, kernel="fastseg::dynamic_mask_head")
_backend.register("dynamic_mask_head", "triton", _triton)
# Provisional orders (the CPU one measured by fastseg/bench/ops_solo.py; no GPU run recorded yet).
_backend.set_preference("dynamic_mask_head", {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")})
