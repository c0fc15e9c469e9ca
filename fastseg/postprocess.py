"""Post-processing of segmentation outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastseg.ops import dense_crf

__all__ = ["crf_refine"]


def crf_refine(logits: Tensor, images: Tensor, *, iterations: int = 10, pos_sxy: float = 3.0,
               pos_compat: float = 3.0, bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0,
               backend: str | None = None) -> Tensor:
    """DeepLab's CRF post-processing: logits [N, K, h, w] at any resolution are upsampled (bilinear,
    align_corners=False) to the images' [N, 3, H, W] size, turned into unary energies −log softmax, and
    refined by :func:`fastseg.ops.dense_crf`. Returns probabilities [N, K, H, W] (float32).

    Example::

        >>> probs = crf_refine(model(images)["out"], images_uint8, iterations=10)
        >>> labels = probs.argmax(1)
    """
    if logits.dim() != 4 or images.dim() != 4:
        raise ValueError(f"logits [N, K, h, w] and images [N, 3, H, W] expected, got {tuple(logits.shape)} and "
                         f"{tuple(images.shape)}")
    size = images.shape[2:]
    if logits.shape[2:] != size:
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    unary = -torch.log_softmax(logits.float(), dim=1)
    return dense_crf(unary, images, iterations=iterations, pos_sxy=pos_sxy, pos_compat=pos_compat, bi_sxy=bi_sxy,
                     bi_srgb=bi_srgb, bi_compat=bi_compat, backend=backend)
