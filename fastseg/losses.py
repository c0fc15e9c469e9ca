"""Segmentation losses: U-Net's weight map and weighted cross entropy, PSPNet's main + auxiliary loss.

* :func:`unet_weight_map` — Ronneberger et al. (2015), eq. 2: w(x) = w_c(x) + w0·exp(-(d1(x) + d2(x))² / 2σ²),
  d1 / d2 the distances to the nearest and second-nearest cell, so that the thin background gaps
  between touching cells weigh most.
* :func:`weighted_cross_entropy` — the paper's pixel-wise softmax cross entropy weighted by such a map.
* :func:`aux_loss` — CE(out) + 0.4·CE(aux) (PSPNet's deep supervision) with ``ignore_index=255``
  (PASCAL VOC's boundary label, as DeepLab and PSPNet train).
* :func:`danet_loss` — DANet's CE(out) + CE(pam) + CE(cam): the fused and both attention branches'
  classifiers, weighted equally as in the authors' code.

Example::

    >>> labels = torch.tensor([[1, 1, 0, 0, 2, 2]])            # two cells, background gap of 2 px
    >>> w = unet_weight_map(labels, w0=10, sigma=5)             # [1, 6]
    >>> logits = torch.randn(1, 2, 1, 6)
    >>> weighted_cross_entropy(logits, (labels > 0).long().unsqueeze(0), w)
    tensor(...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

__all__ = ["aux_loss", "danet_loss", "dice_loss", "focal_loss", "unet_weight_map", "weighted_cross_entropy"]


def unet_weight_map(instance_masks: Tensor | np.ndarray, w0: float = 10.0, sigma: float = 5.0, *,
                    class_weights: Sequence[float] | None = None) -> Tensor:
    """U-Net's pixel weight map (paper, eq. 2) for one image.

    w(x) = w_c(x) + w0 · exp(-(d1(x) + d2(x))² / (2σ²)) where d1 / d2 are the Euclidean distances
    (pixel centre to pixel centre, an exact distance transform per cell) from x to the nearest and the
    second-nearest cell. Choices where the paper is silent:

    * the separation term is added on background pixels only (inside a cell d1 = 0 and the term would
      only blur the cell's own weight; the paper's Fig. 3d weighs the gaps), and is 0 when the image
      has fewer than two cells;
    * w_c balances the two classes, background and cell, by inverse frequency normalised to a mean of
      1 over the image: w_c = H·W / (2 · pixels of the class); with one class present w_c = 1.
      ``class_weights=(w_background, w_cell)`` sets them instead.

    Args:
        instance_masks: [H, W] integer instance labels (0 = background, 1..K = cells) or [K, H, W]
            boolean (or 0/1) masks, one per cell; a torch tensor or a numpy array.
        w0: weight of the separation term (10 in the paper); ≥ 0.
        sigma: its length scale in pixels (5 in the paper); > 0.
        class_weights: optional (background, cell) weights replacing the balancing ones.

    Returns:
        float32 [H, W] weights (on the input's device for a tensor).

    Example::

        >>> labels = torch.tensor([[1, 0, 0, 0, 2]])
        >>> unet_weight_map(labels, w0=10, sigma=5)   # gap pixels: d1 + d2 = 4 → 5/6 + 10·exp(-16/50)
        tensor([[1.2500, 8.0948, 8.0948, 8.0948, 1.2500]])
    """
    if not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if not (isinstance(w0, (int, float)) and w0 >= 0):
        raise ValueError(f"w0 must be a non-negative number, got {w0!r}")
    device = instance_masks.device if isinstance(instance_masks, Tensor) else torch.device("cpu")
    arr = instance_masks.detach().cpu().numpy() if isinstance(instance_masks, Tensor) else np.asarray(instance_masks)
    if arr.ndim == 2:
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"instance_masks: an [H, W] label image must be integer, got {arr.dtype}")
        if (arr < 0).any():
            raise ValueError("instance_masks: labels must be >= 0 (0 = background)")
        ids = np.unique(arr[arr > 0])
        masks = arr[None] == ids[:, None, None] if ids.size else np.zeros((0, *arr.shape), dtype=bool)
    elif arr.ndim == 3:
        if not (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
            raise ValueError("instance_masks: a [K, H, W] stack must hold boolean or 0/1 masks")
        masks = arr.astype(bool)
    else:
        raise ValueError(f"instance_masks must be [H, W] labels or [K, H, W] masks, got shape {arr.shape}")
    h, w = masks.shape[-2:]
    if h == 0 or w == 0:
        raise ValueError(f"instance_masks must have H, W >= 1, got shape {arr.shape}")
    foreground = masks.any(axis=0)

    if class_weights is not None:
        if len(class_weights) != 2:
            raise ValueError(f"class_weights must be (background, cell), got {class_weights!r}")
        wc_bg, wc_fg = float(class_weights[0]), float(class_weights[1])
    else:
        n_fg = int(foreground.sum())
        n_bg = h * w - n_fg
        if n_fg == 0 or n_bg == 0:
            wc_bg = wc_fg = 1.0
        else:
            wc_bg, wc_fg = h * w / (2.0 * n_bg), h * w / (2.0 * n_fg)
    weight = np.where(foreground, wc_fg, wc_bg).astype(np.float64)

    if masks.shape[0] >= 2 and w0 > 0:
        # distance from every pixel to each cell (0 inside it); the two smallest per pixel
        dist = np.stack([ndimage.distance_transform_edt(~m) for m in masks])
        d12 = np.partition(dist, 1, axis=0)[:2].sum(axis=0)
        weight += np.where(foreground, 0.0, w0 * np.exp(-(d12**2) / (2.0 * sigma**2)))
    return torch.from_numpy(weight.astype(np.float32)).to(device)


def _check_logits_target(logits: Tensor, target: Tensor, name: str = "logits") -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"{name} must be a float [N, K, H, W] tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
    if not isinstance(target, Tensor) or target.dim() != 3 or target.dtype != torch.long:
        got = (tuple(target.shape), target.dtype) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"target must be an int64 [N, H, W] tensor, got {got}")
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"target batch {target.shape[0]} != {name} batch {logits.shape[0]}")


def weighted_cross_entropy(logits: Tensor, target: Tensor, weight_map: Tensor, *, reduction: str = "mean",
                           ignore_index: int | None = None) -> Tensor:
    """Pixel-wise softmax cross entropy, each pixel's term multiplied by ``weight_map`` (U-Net, eq. 1).

    Args:
        logits: [N, K, H, W] scores.
        target: [N, H, W] int64 class indices.
        weight_map: [N, H, W] or [H, W] (shared) non-negative weights, e.g. from :func:`unet_weight_map`.
        reduction: ``"mean"`` (over the pixels not ignored), ``"sum"`` (the paper's energy) or ``"none"``
            ([N, H, W], 0 at ignored pixels).
        ignore_index: a target value that contributes nothing (None: every pixel counts).

    For the valid-padding U-Net, crop target and weight map to the output first (centre, 92 px a side).

    Example::

        >>> logits, target = torch.randn(2, 3, 5, 7), torch.randint(0, 3, (2, 5, 7))
        >>> weighted_cross_entropy(logits, target, torch.ones(5, 7))   # == F.cross_entropy(logits, target)
        tensor(...)
    """
    _check_logits_target(logits, target)
    if target.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"target is {tuple(target.shape[-2:])} but logits are {tuple(logits.shape[-2:])} "
                         "(crop the target to a valid U-Net's output)")
    if not isinstance(weight_map, Tensor) or weight_map.shape not in (target.shape, target.shape[-2:]):
        raise ValueError(f"weight_map must be [N, H, W] or [H, W] matching target {tuple(target.shape)}, got "
                         f"{tuple(weight_map.shape) if isinstance(weight_map, Tensor) else type(weight_map).__name__}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    ii = -100 if ignore_index is None else ignore_index
    ce = F.cross_entropy(logits, target, reduction="none", ignore_index=ii)  # 0 at ignored pixels
    loss = ce * weight_map.to(ce.dtype)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = (target != ii).sum() if ignore_index is not None else torch.tensor(target.numel(), device=loss.device)
    return loss.sum() / count.clamp(min=1)


def _ce_mean(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Cross entropy averaged over non-ignored pixels; 0 (not NaN) when every pixel is ignored.
    Logits at another size than the target are resized bilinearly first."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def aux_loss(outputs: Mapping[str, Tensor], target: Tensor, aux_weight: float = 0.4,
             ignore_index: int = 255) -> Tensor:
    """CE(``outputs["out"]``) + ``aux_weight`` · CE(``outputs["aux"]``) — PSPNet's main loss plus 0.4 times the
    auxiliary head's — or CE(out) alone when there is no ``"aux"`` (eval, or a model without one).

    Each cross entropy is the mean over pixels whose target is not ``ignore_index`` (0 when all are);
    logits at another resolution than the target are upsampled bilinearly (align_corners=False) first.

    Args:
        outputs: a model's output dict with ``"out"`` [N, K, h, w] and optionally ``"aux"`` [N, K, h', w'].
        target: [N, H, W] int64 labels.
        aux_weight: weight of the auxiliary loss (0.4 in PSPNet); ≥ 0.
        ignore_index: label excluded from the loss (255: VOC's boundary).

    Example::

        >>> out = {"out": torch.randn(2, 21, 65, 65), "aux": torch.randn(2, 21, 65, 65)}
        >>> aux_loss(out, torch.randint(0, 21, (2, 65, 65)))     # CE(out) + 0.4 · CE(aux)
        tensor(...)
    """
    if not isinstance(outputs, Mapping) or "out" not in outputs:
        raise ValueError(f"outputs must be a dict with an 'out' entry, got "
                         f"{sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}")
    if not (isinstance(aux_weight, (int, float)) and aux_weight >= 0):
        raise ValueError(f"aux_weight must be a non-negative number, got {aux_weight!r}")
    _check_logits_target(outputs["out"], target, "outputs['out']")
    loss = _ce_mean(outputs["out"], target, ignore_index)
    aux = outputs.get("aux")
    if aux is not None:
        _check_logits_target(aux, target, "outputs['aux']")
        loss = loss + aux_weight * _ce_mean(aux, target, ignore_index)
    return loss


def danet_loss(outputs: Mapping[str, Tensor], target: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0),
               ignore_index: int = 255) -> Tensor:
    """DANet's loss: w0·CE(``outputs["out"]``) + w1·CE(``outputs["pam"]``) + w2·CE(``outputs["cam"]``),
    the sum-fusion classifier and the position / channel attention branches' (the authors'
    ``SegmentationMultiLosses`` sums the three with equal weights). The branch terms are skipped
    when the model did not return them (eval mode), leaving CE(out).

    Each cross entropy is the mean over pixels whose target is not ``ignore_index`` (0 when all are);
    logits at another resolution than the target are upsampled bilinearly (align_corners=False) first.

    Args:
        outputs: :class:`fastseg.models.danet.DANet`'s dict: ``"out"`` and optionally ``"pam"``,
            ``"cam"``, each [N, K, h, w].
        target: [N, H, W] int64 labels.
        weights: (out, pam, cam) weights, each ≥ 0.
        ignore_index: label excluded from the loss.

    Example::

        >>> outs = {k: torch.randn(2, 19, 33, 33) for k in ("out", "pam", "cam")}
        >>> danet_loss(outs, torch.randint(0, 19, (2, 33, 33)))     # CE(out) + CE(pam) + CE(cam)
        tensor(...)
    """
    if not isinstance(outputs, Mapping) or "out" not in outputs:
        raise ValueError(f"outputs must be a dict with an 'out' entry, got "
                         f"{sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__}")
    weights = tuple(weights)
    if len(weights) != 3 or not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
        raise ValueError(f"weights must be 3 non-negative numbers (out, pam, cam), got {weights!r}")
    loss = None
    for key, w in zip(("out", "pam", "cam"), weights, strict=True):
        logits = outputs.get(key)
        if logits is None:
            continue
        _check_logits_target(logits, target, f"outputs[{key!r}]")
        term = w * _ce_mean(logits, target, ignore_index)
        loss = term if loss is None else loss + term
    return loss
def dice_loss(probs: Tensor, target: Tensor, *, eps: float = 1e-3) -> Tensor:
    """Per-mask Dice loss (SOLO, V-Net form): 1 - 2·Σpq / (Σp² + Σq² + 2·eps), summed over every dim but the
    first.

    Args:
        probs: [n, ...] soft masks in [0, 1] (sigmoids of mask logits).
        target: [n, ...] binary (bool or 0/1) masks of the same shape.
        eps: smoothing added to each squared sum (mmdet's 1e-3), so that two empty masks give loss 0.

    Returns:
        [n] losses, one per mask (reduce them as the model does: SOLO sums and divides by the positives).

    Example::

        >>> dice_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1, 1]]))   # 1 - 2/(1 + 2 + 0.002)
        tensor([0.3338])
    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point() or probs.dim() < 1:
        raise ValueError(f"probs must be a floating [n, ...] tensor, got {getattr(probs, 'dtype', type(probs))}")
    if not isinstance(target, Tensor) or target.shape != probs.shape:
        raise ValueError(f"target must have probs' shape {tuple(probs.shape)}, got {getattr(target, 'shape', target)}")
    p = probs.flatten(1)
    q = target.flatten(1).to(p.dtype)
    return 1 - 2 * (p * q).sum(1) / ((p * p).sum(1) + (q * q).sum(1) + 2 * eps)


def focal_loss(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0,
               avg_factor: float | Tensor | None = None) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017; ``torchvision.ops.sigmoid_focal_loss``) of class scores against
    integer labels, 0 = background (every class's target 0), c in 1..C = class c; summed and divided by
    ``avg_factor`` (None: the number of rows). SOLO's category loss with ``avg_factor = positives + 1``.

    Args:
        logits: [m, C] scores of C foreground classes.
        labels: [m] int64 in 0..C.

    Example::

        >>> focal_loss(torch.zeros(1, 2), torch.tensor([1]))   # 0.25·0.5²·log 2 + 0.75·0.5²·log 2
        tensor(0.1733)
    """
    from torchvision.ops import sigmoid_focal_loss

    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating [m, C] tensor, got {getattr(logits, 'shape', logits)}")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape[:1] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer [{logits.shape[0]}] tensor, "
                         f"got {getattr(labels, 'shape', labels)}")
    target = F.one_hot(labels.long(), logits.shape[1] + 1)[:, 1:].to(logits.dtype)
    loss = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="sum")
    return loss / (logits.shape[0] if avg_factor is None else avg_factor)
