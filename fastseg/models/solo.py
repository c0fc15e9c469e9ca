"""SOLO, decoupled SOLO (Wang et al., ECCV 2020) and SOLOv2 (Wang et al., NeurIPS 2020): instance
segmentation by locations, with Matrix NMS.

A ResNet + FPN (:class:`~fastseg.models.backbones.fpn.ResNetFPN`) gives P2–P6; the heads run on five levels
(P2 resized to P3's size, P3, P4, P5, P6 resized to P5's size: strides 8, 8, 16, 32, 32 as in the papers'
code). Every level has an S×S grid (40, 36, 24, 16, 12); cell (i, j) predicts C class scores (the category
branch: the level's features resized to S×S, stacked 3×3 conv + GroupNorm(32) + ReLU, 3×3 conv to C) and the
mask of the object whose centre falls in it:

* SOLO: a mask branch (CoordConv: the level's features + two coordinate channels, stacked convs, 2×
  bilinear upsampling, 1×1 conv to S² channels), channel k = i·S + j the mask of cell (i, j);
* decoupled SOLO: X and Y branches of S channels each (CoordConv with their own coordinate only); the mask
  of cell (i, j) is sigmoid(Y_i) ⊙ sigmoid(X_j);
* SOLOv2: a kernel branch (CoordConv, resized to S×S, 4 convs of 512, 3×3 conv to E) predicts, per cell, the
  weights of a dynamic 1×1 conv applied to the unified mask features (P2–P5, each brought to stride 4 by
  conv 128 + GN + ReLU and 2× upsampling steps, CoordConv at P5, summed, 1×1 conv to E + GN + ReLU).

Training (targets: :mod:`fastseg.models.solo_targets`): focal loss (α 0.25, γ 2) on the categories divided by
positives + 1, Dice loss × 3 on the masks of positive cells divided by the positives.

Inference: sigmoid class scores, SOLO's points NMS (a cell is kept where it is the maximum of its 2×2
neighbourhood), scores > ``score_thr``; masks at stride 4 thresholded at ``mask_thr``, masks not larger than
their level's stride dropped, scores rescored by the maskness (mean probability inside the mask), Matrix NMS
(``nms_pre`` candidates, gaussian σ ``nms_sigma``, decayed scores below ``update_thr`` dropped, ``max_per_img``
kept), the kept soft masks upsampled to the input size and thresholded at ``mask_thr``. SOLOv2 does the
mask stage with ``fastseg.ops.dynamic_mask_head`` (no float masks written for the candidates) and
``fastseg.ops.matrix_nms_packed`` on the bit-packed masks, then recomputes the ≤ ``max_per_img`` kept soft
masks from their kernels; SOLO uses ``fastseg.ops.matrix_nms``.

Interface (torchvision detection): ``model(images, targets)`` in train mode → dict of losses; ``model(images)``
in eval mode → a list of ``{"masks": bool [K, H, W], "labels": int64 [K] in 1..C, "scores": [K]}``. ``images``
is a list of [3, H, W] float RGB images in 0..1 (normalised inside with ``image_mean`` / ``image_std``, then
zero-padded at the bottom/right to a common size divisible by 32; no resizing), of any sizes.

Example::

    >>> model = create_model("solov2", num_classes=80).eval()
    >>> out = model([torch.rand(3, 480, 640)])
    >>> out[0]["masks"].shape, out[0]["labels"].shape       # [K, 480, 640], [K]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastseg import ops
from fastseg.losses import dice_loss, focal_loss
from fastseg.models.backbones.fpn import RESNETS, ResNetFPN
from fastseg.models.solo_targets import LevelTargets, assign_level, downsample_masks, mask_geometry
from fastseg.nn.blocks import ConvGNReLU, add_coords, conv_gn_stack

__all__ = ["SOLO", "SOLOv2", "DecoupledSOLO", "decoupled_solo", "solo", "solov2"]

GRIDS = (40, 36, 24, 16, 12)
STRIDES = (8, 8, 16, 32, 32)
SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_SIZE_DIVISIBLE = 32
_PRIOR = -math.log((1 - 0.01) / 0.01)  # bias of a sigmoid output starting at probability 0.01


def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _number(value: object, name: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _init_head(module: nn.Module) -> None:
    """The papers' head init: convs N(0, 0.01), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _SOLOBase(nn.Module):
    """Backbone, category branch, batching, targets, losses and the shared inference steps; subclasses add the
    mask branch (``_mask_outputs``, ``_mask_losses``, ``_predict_masks``)."""

    def __init__(self, num_classes: int, backbone: str, backbone_weights: str | os.PathLike | None,
                 fpn_channels: int, head_channels: int, cls_convs: int, grids: Sequence[int], strides: Sequence[int],
                 scale_ranges: Sequence[Sequence[float]], pos_scale: float, score_thr: float, mask_thr: float,
                 nms_pre: int, update_thr: float, max_per_img: int, nms_kernel: str, nms_sigma: float,
                 focal_alpha: float, focal_gamma: float, dice_weight: float, gn_groups: int,
                 image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        super().__init__()
        _positive_int(num_classes, "num_classes")
        if backbone not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {backbone!r}")
        if backbone_weights is not None and not os.path.isfile(backbone_weights):
            raise ValueError(f"backbone_weights: no such file {os.fspath(backbone_weights)!r}")
        self.grids = tuple(_positive_int(g, "grids") for g in grids)
        self.strides = tuple(_positive_int(s, "strides") for s in strides)
        self.scale_ranges = tuple((float(lo), float(hi)) for lo, hi in scale_ranges)
        if not len(self.grids) == len(self.strides) == len(self.scale_ranges) == 5:
            raise ValueError(f"grids, strides and scale_ranges need 5 entries each (one per level P2..P6), got "
                             f"{len(self.grids)}, {len(self.strides)}, {len(self.scale_ranges)}")
        self.pos_scale = _number(pos_scale, "pos_scale", 0.0, 1.0)
        self.score_thr = _number(score_thr, "score_thr", 0.0, 1.0)
        self.mask_thr = _number(mask_thr, "mask_thr", 0.0, 1.0)
        self.update_thr = _number(update_thr, "update_thr", -1.0, 1.0)
        self.nms_pre, self.max_per_img = _positive_int(nms_pre, "nms_pre"), _positive_int(max_per_img, "max_per_img")
        if nms_kernel not in ("gaussian", "linear"):
            raise ValueError(f"nms_kernel must be 'gaussian' or 'linear', got {nms_kernel!r}")
        self.nms_kernel, self.nms_sigma = nms_kernel, _number(nms_sigma, "nms_sigma", 1e-12)
        self.focal_alpha = _number(focal_alpha, "focal_alpha", 0, 1)
        self.focal_gamma = _number(focal_gamma, "focal_gamma", 0)
        self.dice_weight = _number(dice_weight, "dice_weight", 0)
        if len(tuple(image_mean)) != 3 or len(tuple(image_std)) != 3 or min(image_std) <= 0:
            raise ValueError(f"image_mean and image_std must be 3 values (std > 0), got {image_mean!r}, {image_std!r}")
        self.num_classes, self.gn_groups = num_classes, gn_groups
        self.backbone = ResNetFPN(backbone, _positive_int(fpn_channels, "fpn_channels"), backbone_weights)
        self.cls_convs = conv_gn_stack(fpn_channels, _positive_int(head_channels, "head_channels"), cls_convs,
                                       gn_groups)
        self.conv_cls = nn.Conv2d(head_channels if cls_convs else fpn_channels, num_classes, 3, padding=1)
        _init_head(self.cls_convs)
        _init_head(self.conv_cls)
        nn.init.constant_(self.conv_cls.bias, _PRIOR)
        self.register_buffer("image_mean", torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("image_std", torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1), False)

    # --- batching ------------------------------------------------------------------------------------------

    def _batch(self, images: Sequence[Tensor]) -> Tensor:
        """Normalised images zero-padded (bottom/right) into one [N, 3, Hp, Wp] batch, Hp, Wp divisible by 32."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError(f"images must be a non-empty list of [3, H, W] tensors, got {type(images).__name__}")
        for i, img in enumerate(images):
            if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point() \
                    or img.shape[1] < 1 or img.shape[2] < 1:
                raise ValueError(f"images[{i}] must be a float [3, H, W] tensor, got "
                                 f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
        hp = -(-max(img.shape[1] for img in images) // _SIZE_DIVISIBLE) * _SIZE_DIVISIBLE
        wp = -(-max(img.shape[2] for img in images) // _SIZE_DIVISIBLE) * _SIZE_DIVISIBLE
        dtype = self.conv_cls.weight.dtype  # the model's (float64 for an oracle copy)
        batch = images[0].new_zeros(len(images), 3, hp, wp, dtype=dtype)
        mean, std = self.image_mean.to(dtype), self.image_std.to(dtype)
        for b, img in enumerate(images):
            batch[b, :, : img.shape[1], : img.shape[2]] = (img.to(dtype) - mean) / std
        return batch

    def _levels(self, feats: list[Tensor]) -> list[Tensor]:
        """P2..P6 → the heads' five levels: P2 resized to P3's size, P6 to P5's (strides 8, 8, 16, 32, 32)."""
        p2, p3, p4, p5, p6 = feats
        return [F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False), p3, p4, p5,
                F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)]

    def _category(self, level: Tensor, grid: int) -> Tensor:
        """Class logits [N, C, S, S] of one level."""
        return self.conv_cls(self.cls_convs(F.interpolate(level, size=(grid, grid), mode="bilinear",
                                                          align_corners=False)))

    # --- training ------------------------------------------------------------------------------------------

    def _targets(self, targets: Sequence[dict], padded: tuple[int, int], mask_sizes: Sequence[tuple[int, int]],
                 device: torch.device) -> list[list[LevelTargets]]:
        """targets[image][level] from the images' masks, zero-padded to the batch size."""
        out = []
        for t in targets:
            masks, labels = t["masks"], t["labels"]
            full = masks.new_zeros((masks.shape[0], *padded), dtype=torch.bool).to(device)
            full[:, : masks.shape[1], : masks.shape[2]] = masks.to(device).bool()
            geometry = mask_geometry(full)
            small = {size: downsample_masks(full, size) for size in set(mask_sizes)}
            out.append([assign_level(full, labels, grid, rng, size, self.pos_scale, geometry=geometry,
                                     small_masks=small[size])
                        for grid, rng, size in zip(self.grids, self.scale_ranges, mask_sizes, strict=True)])
        return out

    def _losses(self, cls_logits: list[Tensor], targets: list[list[LevelTargets]],
                mask_losses: Tensor) -> dict[str, Tensor]:
        """Focal loss over every cell (divided by positives + 1) and the Dice losses of the positives
        (``mask_losses``, one per positive) × ``dice_weight``, divided by the positives."""
        num_pos = mask_losses.shape[0]
        logits = torch.cat([c.permute(0, 2, 3, 1).reshape(-1, self.num_classes) for c in cls_logits])
        labels = torch.cat([torch.stack([t[lvl].labels for t in targets]).view(-1) for lvl in range(len(self.grids))])
        loss_cls = focal_loss(logits, labels, alpha=self.focal_alpha, gamma=self.focal_gamma, avg_factor=num_pos + 1)
        loss_mask = self.dice_weight * mask_losses.sum() / max(num_pos, 1)
        return {"loss_cls": loss_cls, "loss_mask": loss_mask}

    def _check_train_inputs(self, images: Sequence[Tensor], targets: Sequence[dict] | None) -> None:
        if targets is None:
            raise ValueError("targets are needed in train mode (a list of dicts with 'masks' and 'labels')")
        if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
            raise ValueError(f"targets must be a list of {len(images)} dicts, one per image")
        for b, (img, t) in enumerate(zip(images, targets, strict=True)):
            if not isinstance(t, dict) or "masks" not in t or "labels" not in t:
                raise ValueError(f"targets[{b}] must be a dict with 'masks' and 'labels'")
            masks, labels = t["masks"], t["labels"]
            if not isinstance(masks, Tensor) or masks.dim() != 3:
                raise ValueError(f"targets[{b}]['masks'] must be a bool [n, H, W] tensor, got "
                                 f"{getattr(masks, 'shape', masks)}")
            if tuple(masks.shape[1:]) != tuple(img.shape[1:]):
                raise ValueError(f"targets[{b}]['masks'] are {tuple(masks.shape[1:])} but images[{b}] is "
                                 f"{tuple(img.shape[1:])}")
            if not isinstance(labels, Tensor) or labels.shape != masks.shape[:1] or labels.is_floating_point():
                raise ValueError(f"targets[{b}]['labels'] must be an int64 [{masks.shape[0]}] tensor")
            if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.num_classes):
                raise ValueError(f"targets[{b}]['labels'] must be in 1..{self.num_classes}")

    # --- inference -----------------------------------------------------------------------------------------

    def _candidates(self, cls_logits: list[Tensor], b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Image b's candidates over all levels: (level-concatenated cell index, class 0..C-1, score, stride);
        points NMS (2×2 local maxima) then ``score_thr``."""
        cells, classes, scores, strides = [], [], [], []
        offset = 0
        for logits, grid, stride in zip(cls_logits, self.grids, self.strides, strict=True):
            prob = logits[b : b + 1].sigmoid()
            local_max = F.max_pool2d(prob, 2, stride=1, padding=1)[..., :-1, :-1]
            prob = (prob * (local_max == prob))[0]  # [C, S, S]
            cls, cell = (prob.view(self.num_classes, -1) > self.score_thr).nonzero(as_tuple=True)
            cells.append(cell + offset)
            classes.append(cls)
            scores.append(prob.view(self.num_classes, -1)[cls, cell])
            strides.append(torch.full_like(cell, stride))
            offset += grid * grid
        return torch.cat(cells), torch.cat(classes), torch.cat(scores), torch.cat(strides)

    def _upsample(self, soft: Tensor, padded: tuple[int, int], size: Sequence[int]) -> Tensor:
        """Soft masks [K, h, w] on the padded image → bool [K, H, W] at the image's size."""
        if soft.shape[0] == 0:
            return soft.new_zeros((0, *size), dtype=torch.bool)
        full = F.interpolate(soft.unsqueeze(0), size=padded, mode="bilinear", align_corners=False)[0]
        return full[:, : size[0], : size[1]] > self.mask_thr

    def _empty(self, size: Sequence[int], device: torch.device) -> dict[str, Tensor]:
        return {"masks": torch.zeros((0, *size), dtype=torch.bool, device=device),
                "labels": torch.zeros(0, dtype=torch.long, device=device),
                "scores": torch.zeros(0, dtype=self.conv_cls.weight.dtype, device=device)}

    def _finish_soft(self, soft: Tensor, classes: Tensor, scores: Tensor, strides: Tensor,
                     padded: tuple[int, int], size: Sequence[int]) -> dict[str, Tensor]:
        """SOLO's mask stage on soft masks [m, h, w] (stride 4): threshold, area filter, maskness, Matrix NMS,
        the kept masks upsampled."""
        masks = soft > self.mask_thr
        areas = masks.sum((1, 2)).to(soft.dtype)
        keep = areas > strides
        soft, masks, areas, classes, scores = soft[keep], masks[keep], areas[keep], classes[keep], scores[keep]
        if soft.shape[0] == 0:
            return self._empty(size, soft.device)
        scores = scores * (soft * masks).sum((1, 2)) / areas
        scores, labels, _, keep_inds = ops.matrix_nms(
            masks, classes, scores, kernel=self.nms_kernel, sigma=self.nms_sigma, filter_thr=self.update_thr,
            nms_pre=self.nms_pre, max_num=self.max_per_img, mask_area=areas)
        return {"masks": self._upsample(soft[keep_inds], padded, size), "labels": labels + 1, "scores": scores}

    def forward(self, images: Sequence[Tensor], targets: Sequence[dict] | None = None):
        """Train: dict of losses (``loss_cls``, ``loss_mask``); eval: a list of per-image result dicts."""
        x = self._batch(images)
        if self.training:
            self._check_train_inputs(images, targets)
        padded = (x.shape[2], x.shape[3])
        feats = self.backbone(x)
        levels = self._levels(feats)
        cls_logits = [self._category(lvl, g) for lvl, g in zip(levels, self.grids, strict=True)]
        if self.training:
            return self._train(feats, levels, cls_logits, targets, padded)
        sizes = [tuple(img.shape[1:]) for img in images]
        return self._predict(feats, levels, cls_logits, padded, sizes)


class SOLO(_SOLOBase):
    """SOLO (vanilla): a CoordConv mask branch of S² channels per level at 2× the level's resolution.

    Args:
        num_classes: foreground classes C (labels 1..C).
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101`` (torchvision, ``weights=None``).
        backbone_weights: path of a local torchvision ResNet checkpoint.
        fpn_channels: FPN width (256).
        head_channels, stacked_convs: width and depth of the category and mask branches (256, 7).
        grids, strides, scale_ranges, pos_scale: per-level grid S, stride (the inference area filter), range of
            √(w·h), centre-region ε (0.2).
        score_thr, mask_thr, nms_pre, update_thr, max_per_img, nms_kernel, nms_sigma: inference (0.1, 0.5, 500,
            0.05, 100, ``"gaussian"``, 2.0).
        focal_alpha, focal_gamma, dice_weight: losses (0.25, 2.0, 3.0).
        gn_groups: GroupNorm groups (32).
        image_mean, image_std: normalisation of the 0..1 RGB input (ImageNet's).
    """

    def __init__(self, num_classes: int = 80, backbone: str = "resnet50",
                 backbone_weights: str | os.PathLike | None = None, fpn_channels: int = 256, head_channels: int = 256,
                 stacked_convs: int = 7, grids: Sequence[int] = GRIDS, strides: Sequence[int] = STRIDES,
                 scale_ranges: Sequence[Sequence[float]] = SCALE_RANGES, pos_scale: float = 0.2,
                 score_thr: float = 0.1, mask_thr: float = 0.5, nms_pre: int = 500, update_thr: float = 0.05,
                 max_per_img: int = 100, nms_kernel: str = "gaussian", nms_sigma: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, dice_weight: float = 3.0, gn_groups: int = 32,
                 image_mean: Sequence[float] = _IMAGENET_MEAN, image_std: Sequence[float] = _IMAGENET_STD) -> None:
        super().__init__(num_classes, backbone, backbone_weights, fpn_channels, head_channels, stacked_convs, grids,
                         strides, scale_ranges, pos_scale, score_thr, mask_thr, nms_pre, update_thr, max_per_img,
                         nms_kernel, nms_sigma, focal_alpha, focal_gamma, dice_weight, gn_groups, image_mean,
                         image_std)
        self._build_mask_branch(fpn_channels, head_channels, stacked_convs, gn_groups)

    def _build_mask_branch(self, fpn_channels: int, channels: int, depth: int, groups: int) -> None:
        self.mask_convs = conv_gn_stack(fpn_channels + 2, channels, depth, groups)
        width = channels if depth else fpn_channels + 2
        self.conv_mask = nn.ModuleList(nn.Conv2d(width, g * g, 1) for g in self.grids)
        _init_head(self.mask_convs)
        _init_head(self.conv_mask)
        for m in self.conv_mask:
            nn.init.constant_(m.bias, _PRIOR)

    def _mask_logits(self, levels: list[Tensor]) -> list[Tensor]:
        """Per level [N, S², 2h, 2w] mask logits."""
        out = []
        for lvl, conv in zip(levels, self.conv_mask, strict=True):
            feat = F.interpolate(self.mask_convs(add_coords(lvl)), scale_factor=2.0, mode="bilinear",
                                 align_corners=False)
            out.append(conv(feat))
        return out

    def _train(self, feats, levels, cls_logits, targets, padded):
        masks = self._mask_logits(levels)
        t = self._targets(targets, padded, [tuple(m.shape[-2:]) for m in masks], masks[0].device)
        losses = [dice_loss(masks[lvl][b, t[b][lvl].positive].sigmoid(), t[b][lvl].masks)
                  for b in range(len(t)) for lvl in range(len(masks))]
        return self._losses(cls_logits, t, torch.cat(losses + [masks[0].new_zeros(0)]) + 0 * masks[0].sum())

    def _soft_masks(self, masks: list[Tensor], b: int, cells: Tensor, size: tuple[int, int]) -> Tensor:
        """Sigmoid masks of image b's candidate cells (level-concatenated indices), at stride 4."""
        out = torch.zeros(cells.shape[0], *size, dtype=self.conv_cls.weight.dtype, device=cells.device)
        offset = 0
        for lvl, g in enumerate(self.grids):
            sel = ((cells >= offset) & (cells < offset + g * g)).nonzero().flatten()
            if sel.numel():
                soft = self._level_soft(masks, lvl, b, cells[sel] - offset)
                out[sel] = F.interpolate(soft.unsqueeze(0), size=size, mode="bilinear", align_corners=False)[0]
            offset += g * g
        return out

    def _level_soft(self, masks: list[Tensor], lvl: int, b: int, cells: Tensor) -> Tensor:
        return masks[lvl][b, cells].sigmoid()

    def _predict(self, feats, levels, cls_logits, padded, sizes):
        masks = self._mask_logits(levels)
        stride4 = (padded[0] // 4, padded[1] // 4)
        results = []
        for b, size in enumerate(sizes):
            cells, classes, scores, strides = self._candidates(cls_logits, b)
            if cells.numel() == 0:
                results.append(self._empty(size, cells.device))
                continue
            soft = self._soft_masks(masks, b, cells, stride4)
            results.append(self._finish_soft(soft, classes, scores, strides.to(soft.dtype), padded, size))
        return results


class DecoupledSOLO(SOLO):
    """Decoupled SOLO: X and Y branches of S channels per level (CoordConv with the x, respectively y,
    coordinate), the mask of cell (i, j) sigmoid(Y_i) ⊙ sigmoid(X_j); same arguments as :class:`SOLO`."""

    def _build_mask_branch(self, fpn_channels: int, channels: int, depth: int, groups: int) -> None:
        self.mask_convs_x = conv_gn_stack(fpn_channels + 1, channels, depth, groups)
        self.mask_convs_y = conv_gn_stack(fpn_channels + 1, channels, depth, groups)
        width = channels if depth else fpn_channels + 1
        self.conv_mask_x = nn.ModuleList(nn.Conv2d(width, g, 3, padding=1) for g in self.grids)
        self.conv_mask_y = nn.ModuleList(nn.Conv2d(width, g, 3, padding=1) for g in self.grids)
        for m in (self.mask_convs_x, self.mask_convs_y, self.conv_mask_x, self.conv_mask_y):
            _init_head(m)
        for m in (*self.conv_mask_x, *self.conv_mask_y):
            nn.init.constant_(m.bias, _PRIOR)

    def _mask_logits(self, levels: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per level (X [N, S, 2h, 2w], Y [N, S, 2h, 2w]) logits."""
        out = []
        for lvl, cx, cy in zip(levels, self.conv_mask_x, self.conv_mask_y, strict=True):
            with_coords = add_coords(lvl)
            x_feat = self.mask_convs_x(torch.cat([lvl, with_coords[:, -2:-1]], 1))
            y_feat = self.mask_convs_y(torch.cat([lvl, with_coords[:, -1:]], 1))
            up = [F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False) for f in (x_feat, y_feat)]
            out.append((cx(up[0]), cy(up[1])))
        return out

    def _level_soft(self, masks, lvl: int, b: int, cells: Tensor) -> Tensor:
        g = self.grids[lvl]
        x, y = masks[lvl]
        return y[b, cells // g].sigmoid() * x[b, cells % g].sigmoid()

    def _train(self, feats, levels, cls_logits, targets, padded):
        masks = self._mask_logits(levels)
        t = self._targets(targets, padded, [tuple(m[0].shape[-2:]) for m in masks], masks[0][0].device)
        losses = [dice_loss(self._level_soft(masks, lvl, b, t[b][lvl].positive), t[b][lvl].masks)
                  for b in range(len(t)) for lvl in range(len(masks))]
        zero = 0 * (masks[0][0].sum() + masks[0][1].sum())
        return self._losses(cls_logits, t, torch.cat(losses + [masks[0][0].new_zeros(0)]) + zero)


class SOLOv2(_SOLOBase):
    """SOLOv2: dynamic mask kernels per cell on unified mask features at stride 4.

    Args (besides :class:`SOLO`'s ``num_classes``, ``backbone``, ``backbone_weights``, ``fpn_channels``, grids,
    thresholds, losses, ``gn_groups``, normalisation):
        head_channels, stacked_convs: width and depth of the category and kernel branches (512, 4).
        mask_feat_channels: width of the mask feature branch's levels (128).
        mask_channels: E, the unified mask features' channels and the kernels' length (256).
    """

    def __init__(self, num_classes: int = 80, backbone: str = "resnet50",
                 backbone_weights: str | os.PathLike | None = None, fpn_channels: int = 256, head_channels: int = 512,
                 stacked_convs: int = 4, mask_feat_channels: int = 128, mask_channels: int = 256,
                 grids: Sequence[int] = GRIDS, strides: Sequence[int] = STRIDES,
                 scale_ranges: Sequence[Sequence[float]] = SCALE_RANGES, pos_scale: float = 0.2,
                 score_thr: float = 0.1, mask_thr: float = 0.5, nms_pre: int = 500, update_thr: float = 0.05,
                 max_per_img: int = 100, nms_kernel: str = "gaussian", nms_sigma: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, dice_weight: float = 3.0, gn_groups: int = 32,
                 image_mean: Sequence[float] = _IMAGENET_MEAN, image_std: Sequence[float] = _IMAGENET_STD) -> None:
        super().__init__(num_classes, backbone, backbone_weights, fpn_channels, head_channels, stacked_convs, grids,
                         strides, scale_ranges, pos_scale, score_thr, mask_thr, nms_pre, update_thr, max_per_img,
                         nms_kernel, nms_sigma, focal_alpha, focal_gamma, dice_weight, gn_groups, image_mean,
                         image_std)
        _positive_int(mask_feat_channels, "mask_feat_channels")
        _positive_int(mask_channels, "mask_channels")
        self.kernel_convs = conv_gn_stack(fpn_channels + 2, head_channels, stacked_convs, gn_groups)
        self.conv_kernel = nn.Conv2d(head_channels if stacked_convs else fpn_channels + 2, mask_channels, 3, padding=1)
        # Unified mask features: P2..P5, level k through k conv + GN + ReLU + 2× upsampling steps (P2: one conv).
        self.mask_feat = nn.ModuleList()
        for k in range(4):
            steps: list[nn.Module] = []
            for s in range(max(k, 1)):
                in_ch = mask_feat_channels if s else fpn_channels + (2 if k == 3 else 0)
                steps.append(ConvGNReLU(in_ch, mask_feat_channels, 3, gn_groups))
                if k:
                    steps.append(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False))
            self.mask_feat.append(nn.Sequential(*steps))
        self.mask_pred = nn.Sequential(nn.Conv2d(mask_feat_channels, mask_channels, 1, bias=False),
                                       nn.GroupNorm(gn_groups, mask_channels), nn.ReLU(inplace=True))
        _init_head(self.kernel_convs)
        _init_head(self.conv_kernel)
        _init_head(self.mask_feat)
        _init_head(self.mask_pred)
        self.mask_channels = mask_channels

    def _mask_features(self, feats: list[Tensor]) -> Tensor:
        """Unified mask features [N, E, H/4, W/4] from P2..P5."""
        out = self.mask_feat[0](feats[0])
        for k in range(1, 4):
            f = add_coords(feats[k]) if k == 3 else feats[k]
            out = out + self.mask_feat[k](f)
        return self.mask_pred(out)

    def _kernels(self, levels: list[Tensor]) -> list[Tensor]:
        """Per level [N, S², E] dynamic kernels."""
        out = []
        for lvl, g in zip(levels, self.grids, strict=True):
            f = F.interpolate(add_coords(lvl), size=(g, g), mode="bilinear", align_corners=False)
            out.append(self.conv_kernel(self.kernel_convs(f)).flatten(2).transpose(1, 2))
        return out

    def _train(self, feats, levels, cls_logits, targets, padded):
        mask_feat = self._mask_features(feats)
        kernels = self._kernels(levels)
        n, e, h, w = mask_feat.shape
        t = self._targets(targets, padded, [(h, w)] * len(self.grids), mask_feat.device)
        losses = []
        for b in range(n):
            pos_kernels = torch.cat([kernels[lvl][b, t[b][lvl].positive] for lvl in range(len(kernels))])
            if pos_kernels.shape[0] == 0:
                continue
            logits = (pos_kernels @ mask_feat[b].view(e, h * w)).view(-1, h, w)
            losses.append(dice_loss(logits.sigmoid(), torch.cat([t[b][lvl].masks for lvl in range(len(kernels))])))
        zero = 0 * (mask_feat.sum() + sum(k.sum() for k in kernels))
        return self._losses(cls_logits, t, torch.cat(losses + [mask_feat.new_zeros(0)]) + zero)

    def _predict(self, feats, levels, cls_logits, padded, sizes):
        mask_feat = self._mask_features(feats)
        kernels = torch.cat(self._kernels(levels), 1)  # [N, ΣS², E]
        _, e, h, w = mask_feat.shape
        results = []
        for b, size in enumerate(sizes):
            cells, classes, scores, strides = self._candidates(cls_logits, b)
            k = kernels[b, cells]
            dm = ops.dynamic_mask_head(k, mask_feat[b], mask_thr=self.mask_thr, strides=strides, score=scores)
            keep = dm.keep
            if not bool(keep.any()):
                results.append(self._empty(size, k.device))
                continue
            scores, labels, keep_inds = ops.matrix_nms_packed(
                dm.masks[keep], h * w, classes[keep], dm.scores[keep], mask_area=dm.areas[keep],
                kernel=self.nms_kernel, sigma=self.nms_sigma, filter_thr=self.update_thr, nms_pre=self.nms_pre,
                max_num=self.max_per_img)
            soft = (k[keep][keep_inds] @ mask_feat[b].view(e, h * w)).sigmoid().view(-1, h, w)
            results.append({"masks": self._upsample(soft, padded, size), "labels": labels + 1, "scores": scores})
        return results


def solo(**kwargs) -> SOLO:
    """SOLO with the paper's defaults (ResNet-50-FPN, 7 convs of 256); keyword arguments as :class:`SOLO`."""
    return SOLO(**kwargs)


def decoupled_solo(**kwargs) -> DecoupledSOLO:
    """Decoupled SOLO; keyword arguments as :class:`SOLO`."""
    return DecoupledSOLO(**kwargs)


def solov2(**kwargs) -> SOLOv2:
    """SOLOv2 with the paper's defaults (ResNet-50-FPN, kernel branch of 4 convs of 512, E = 256); keyword
    arguments as :class:`SOLOv2`."""
    return SOLOv2(**kwargs)
