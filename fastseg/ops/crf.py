"""Fully connected CRF (Krähenbühl & Koltun 2011) mean-field inference with pydensecrf's semantics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastseg.ops import _backend, _reference

__all__ = ["dense_crf"]


def _positive(name: str, v: float) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def dense_crf(unary: Tensor, image: Tensor, *, iterations: int = 5, pos_sxy: float = 3.0, pos_compat: float = 3.0,
              bi_sxy: float = 80.0, bi_srgb: float = 13.0, bi_compat: float = 10.0,
              backend: str | None = None) -> Tensor:
    """Mean-field inference of DeepLab's fully connected CRF, as pydensecrf computes it.

    ``DenseCRF2D`` + ``addPairwiseGaussian(pos_sxy, pos_compat)`` + ``addPairwiseBilateral(bi_sxy, bi_srgb,
    image, bi_compat)`` + ``inference(iterations)``: Q₀ = softmax(−U); each iteration
    Q = softmax(−U + Σ_k w_k K̃_k Q) (Potts), K̃ = D^-½ K D^-½ with Gaussian kernels on (x, y)/pos_sxy and
    on ((x, y)/bi_sxy, rgb/bi_srgb), filtered with the permutohedral lattice (built once per image and
    kernel). Differentiable with respect to ``unary`` (CRF-as-RNN training through the iterations).

    Args:
        unary: energies −log p, floating [C, H, W] or [N, C, H, W].
        image: [3, H, W] or [N, 3, H, W], uint8 or floating in 0..255.
        iterations: mean-field steps (>= 0; 0 gives softmax(−U)).

    Returns:
        Q, probabilities of the unary's shape and dtype.

    Example::

        >>> q = dense_crf(-torch.log_softmax(logits, 0), image, iterations=10, pos_compat=3.0, bi_sxy=80.0,
        ...               bi_srgb=13.0, bi_compat=10.0)
    """
    if not isinstance(unary, Tensor) or unary.dim() not in (3, 4) or not unary.is_floating_point():
        raise ValueError(f"unary must be a floating [C, H, W] or [N, C, H, W] tensor, got "
                         f"{getattr(unary, 'dtype', unary)} {getattr(unary, 'shape', '')}")
    if not isinstance(image, Tensor) or image.dim() != unary.dim():
        raise ValueError(f"image must be [3, H, W] or [N, 3, H, W] like unary, got {getattr(image, 'shape', image)}")
    single = unary.dim() == 3
    u, img = (unary.unsqueeze(0), image.unsqueeze(0)) if single else (unary, image)
    if img.shape[1] != 3:
        raise ValueError(f"image must have 3 channels (RGB), got shape {tuple(image.shape)}")
    if img.shape[0] != u.shape[0] or img.shape[2:] != u.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and unary {tuple(unary.shape)} differ in batch or size")
    if img.dtype != torch.uint8 and not img.is_floating_point():
        raise ValueError(f"image must be uint8 or floating point, got {img.dtype}")
    if img.device != u.device:
        raise ValueError(f"image is on {img.device} but unary is on {u.device}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    params = (_positive("pos_sxy", pos_sxy), float(pos_compat), _positive("bi_sxy", bi_sxy),
              _positive("bi_srgb", bi_srgb), float(bi_compat))
    impl = _backend.resolve("dense_crf", u.device, backend)
    q = impl(u, img, iterations, *params)
    return q[0] if single else q


def _reference_impl(unary, image, iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat):
    return _reference.dense_crf(unary, image.to(unary.dtype), iterations=iterations, pos_sxy=pos_sxy,
                                pos_compat=pos_compat, bi_sxy=bi_sxy, bi_srgb=bi_srgb, bi_compat=bi_compat)


def _compiled_impl(unary, image, *args):
    """The C++/CUDA kernels compute in float32 (as pydensecrf); other dtypes are converted."""
    q = torch.ops.fastseg.dense_crf(unary.float().contiguous(), image.float().contiguous(), *args)
    return q.to(unary.dtype)


_backend.register("dense_crf", "reference", _reference_impl)
_backend.register("dense_crf", "cpu", _compiled_impl, kernel="fastseg::dense_crf")
_backend.register("dense_crf", "cuda", _compiled_impl, kernel="fastseg::dense_crf")
# Measured on CPU (bench/results/); the CUDA order is provisional until a GPU run is recorded.
_backend.set_preference("dense_crf", {"cpu": ("cpu", "reference"), "cuda": ("cuda", "reference")})
