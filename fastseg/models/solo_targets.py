"""SOLO's target assignment (Wang et al., ECCV 2020, §3.1 and mmdet's ``SOLOHead._get_targets_single``).

For each pyramid level with grid S and scale range (lo, hi), an object whose scale √(w·h) (w, h: the width and
height of its mask's bounding box, in pixels) lies in [lo, hi] is positive in the grid cells of its *centre
region*: the box of half-sizes ε·w/2, ε·h/2 (ε = ``pos_scale`` = 0.2) around its mass centre, clipped to the
3×3 cells around the cell holding the centre. The grid covers the (padded) image: cell (i, j) spans rows
[i·H/S, (i+1)·H/S) and columns [j·W/S, (j+1)·W/S). Pixel (r, c) covers [r, r+1) × [c, c+1), so the mass centre
is the mean pixel index + 0.5. An object may be positive on two levels (the ranges overlap); where two objects
claim one cell the later one wins (mmdet's loop order). Empty masks are ignored.

Example::

    >>> masks = torch.zeros(1, 64, 64, dtype=torch.bool); masks[0, 20:40, 8:28] = True
    >>> t = assign_level(masks, torch.tensor([3]), grid=8, scale_range=(1, 96), mask_size=(16, 16))
    >>> t.positive.tolist(), t.labels.view(-1)[t.positive].tolist()   # centre (30, 18): cell (3, 2);
    ([26, 34], [3, 3])                                                # rows 28..32 reach cell row 4
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["LevelTargets", "assign_level", "downsample_masks", "mask_geometry"]


class LevelTargets(NamedTuple):
    """One image's targets on one level of grid S.

    Attributes:
        labels: [S, S] int64, the class (1..C) of each cell, 0 = background.
        positive: [P] int64 indices i·S + j of the positive cells, ascending.
        gt_index: [P] int64, the object each positive cell predicts.
        masks: [P, h, w] bool, that object's mask at the level's mask resolution ``mask_size``.
    """

    labels: Tensor
    positive: Tensor
    gt_index: Tensor
    masks: Tensor


def mask_geometry(masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Of boolean masks [n, H, W]: (centres [n, 2] as (y, x) in pixels, the mass centre with pixel r covering
    [r, r+1); box sizes [n, 2] as (h, w), rows and columns spanned; non-empty [n] bool). Empty masks get zeros."""
    m = masks.float()
    area = m.sum((1, 2))
    rows, cols = m.sum(2), m.sum(1)  # [n, H], [n, W]
    ys = torch.arange(masks.shape[1], dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(masks.shape[2], dtype=torch.float32, device=masks.device) + 0.5
    safe = area.clamp(min=1)
    centre = torch.stack([(rows * ys).sum(1) / safe, (cols * xs).sum(1) / safe], 1)

    def span(profile: Tensor) -> Tensor:
        hit = profile > 0
        idx = torch.arange(profile.shape[1], device=profile.device)
        first = torch.where(hit, idx, profile.shape[1]).amin(1)
        last = torch.where(hit, idx, -1).amax(1)
        return (last - first + 1).clamp(min=0).float()

    return centre, torch.stack([span(rows), span(cols)], 1), area > 0


def downsample_masks(masks: Tensor, size: Sequence[int]) -> Tensor:
    """Boolean masks [n, H, W] at ``size`` = (H/f, W/f) for an integer factor f: a pixel is set where at least
    half of its f×f block is (area averaging, then ≥ 0.5)."""
    h, w = masks.shape[-2:]
    if h % size[0] or w % size[1] or h // size[0] != w // size[1]:
        raise ValueError(f"mask size {tuple(size)} must divide the masks' {(h, w)} by one integer factor")
    f = h // size[0]
    if f == 1 or masks.shape[0] == 0:
        return masks.bool() if f == 1 else masks.new_zeros((0, *size), dtype=torch.bool)
    return F.avg_pool2d(masks.float().unsqueeze(1), f).squeeze(1) >= 0.5


def assign_level(masks: Tensor, labels: Tensor, grid: int, scale_range: Sequence[float], mask_size: Sequence[int],
                 pos_scale: float = 0.2, *, geometry: tuple[Tensor, Tensor, Tensor] | None = None,
                 small_masks: Tensor | None = None) -> LevelTargets:
    """One image's :class:`LevelTargets` on one level.

    Args:
        masks: [n, H, W] bool object masks on the padded image (the grid covers H×W).
        labels: [n] int64 classes 1..C.
        grid: S.
        scale_range: (lo, hi) on √(w·h), inclusive.
        mask_size: (h, w) of the level's mask targets (H, W divided by an integer).
        pos_scale: ε, the centre region's size relative to the box.
        geometry: :func:`mask_geometry` of ``masks`` when the caller has it already.
        small_masks: :func:`downsample_masks` of ``masks`` at ``mask_size`` when the caller has it already.
    """
    n, height, width = masks.shape
    device = masks.device
    centre, size, valid = mask_geometry(masks) if geometry is None else geometry
    scale = torch.sqrt(size[:, 0] * size[:, 1])
    chosen = valid & (scale >= scale_range[0]) & (scale <= scale_range[1])
    cell_gt = torch.full((grid, grid), -1, dtype=torch.long)
    for g in chosen.nonzero().flatten().tolist():
        cy, cx = centre[g].tolist()
        ry, rx = 0.5 * pos_scale * size[g, 0].item(), 0.5 * pos_scale * size[g, 1].item()
        ci, cj = _cell(cy, height, grid), _cell(cx, width, grid)
        top = max(_cell(cy - ry, height, grid), ci - 1)
        down = min(_cell(cy + ry, height, grid), ci + 1)
        left = max(_cell(cx - rx, width, grid), cj - 1)
        right = min(_cell(cx + rx, width, grid), cj + 1)
        cell_gt[top:down + 1, left:right + 1] = g
    cell_gt = cell_gt.view(-1).to(device)
    positive = (cell_gt >= 0).nonzero().flatten()
    gt_index = cell_gt[positive]
    cell_labels = torch.zeros(grid * grid, dtype=torch.long, device=device)
    cell_labels[positive] = labels.to(device).long()[gt_index]
    if small_masks is None:
        small_masks = downsample_masks(masks, mask_size)
    return LevelTargets(cell_labels.view(grid, grid), positive, gt_index, small_masks[gt_index])


def _cell(coord: float, extent: int, grid: int) -> int:
    """The grid index of a coordinate, clipped to [0, S - 1]."""
    return min(max(math.floor(coord / extent * grid), 0), grid - 1)
