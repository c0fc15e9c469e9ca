"""AUNet: attention-guided unified network for panoptic segmentation (Li et al., CVPR 2019).

A ResNet + FPN (P2-P6) backbone feeds three branches:

* RPN (torchvision's), whose shared 3x3 features R_i also drive the Proposal Attention Module;
* foreground: Mask R-CNN box head and mask head (14x14 pooling -> 28x28 mask logits), RoIs pooled with
  :class:`fastseg.nn.MultiScaleRoIAlign` (fastseg's roi_align kernel);
* background: on each level P2-P5 a conv stack gives stuff features S_i, refined by
  PAM  (A_i = 1 - sigmoid(conv1x1(R_i)); S_i <- S_i * A_i + S_i; S_i <- S_i * sigmoid(W GAP(S_i))) and
  MAM  (the kept RoIs' mask logits of their class mapped onto level i by
  ``fastseg.ops.roi_upsample(mode="aunet")`` -> conv -> A_i = 1 - sigmoid; same update and re-weighting),
  then upsampled to 1/4, summed and classified into the stuff classes + one "things" class.

Panoptic fusion (:func:`panoptic_fusion`): instances by score (>= 0.5), each pixel to at most one
instance, an instance whose visible part is < 50% of its mask is dropped, stuff fills the rest and
stuff segments below ``stuff_min_area`` pixels become void (id 0).

Class ids: things are 1..num_classes (0 is the detector's background), stuff 0..num_stuff_classes-1;
``semantic`` outputs num_stuff_classes for "things". ``segments_info`` entries carry
``isthing`` to tell the two id spaces apart.

Example::

    >>> model = create_model("aunet", num_classes=80, num_stuff_classes=53, backbone="resnet50").eval()
    >>> out = model([torch.rand(3, 480, 640)])[0]
    >>> out["panoptic"].shape, out["panoptic"].dtype
    (torch.Size([480, 640]), torch.int32)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from fastseg.models.backbones.resnet import load_backbone_weights
from fastseg.nn import MultiScaleRoIAlign, RoIUpsample

__all__ = ["AUNet", "aunet", "panoptic_fusion"]

_RESNETS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256}  # layer1 channels
_LEVELS = ("0", "1", "2", "3")  # P2..P5: the background branch's levels (P6 only serves the RPN)


class _RPNHead(RPNHead):
    """torchvision's RPNHead that also hands out its shared 3x3 features R_i (the PAM's input)."""

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        shared = [self.conv(f) for f in x]
        self.shared = shared  # read (and cleared) by AUNet.forward right after the RPN call
        return [self.cls_logits(t) for t in shared], [self.bbox_pred(t) for t in shared]


class _Attention(nn.Module):
    """AUNet's attention update of stuff features S [N, C, H, W] from a guide G [N, Cg, H, W]:
    A = 1 - sigmoid(conv(G)); S <- S * A + S; then background re-weighting S <- S * sigmoid(W GAP(S))."""

    def __init__(self, guide_channels: int, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(guide_channels, channels, kernel_size, padding=kernel_size // 2)
        self.reweight = nn.Conv2d(channels, channels, 1)

    def forward(self, s: Tensor, guide: Tensor) -> Tensor:
        a = 1 - torch.sigmoid(self.conv(guide))
        s = s * a + s
        return s * torch.sigmoid(self.reweight(F.adaptive_avg_pool2d(s, 1)))


def _conv_stack(c_in: int, c_out: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def panoptic_fusion(masks: Tensor, scores: Tensor, labels: Tensor, semantic: Tensor, num_stuff_classes: int, *,
                    score_thresh: float = 0.5, overlap_thresh: float = 0.5,
                    stuff_min_area: int = 4096) -> tuple[Tensor, list[dict]]:
    """Heuristic panoptic fusion (Mask R-CNN instances over semantic stuff).

    Args:
        masks: [K, H, W] bool instance masks; scores [K]; labels [K] (things, 1-based).
        semantic: [H, W] labels 0..num_stuff_classes (num_stuff_classes = "things").
        score_thresh: instances scoring below are dropped.
        overlap_thresh: an instance keeps its pixels only if at least this fraction of its mask is
            still free when its turn comes (instances go by descending score).
        stuff_min_area: stuff segments with fewer pixels become void.

    Returns:
        panoptic [H, W] int32 segment ids (0 = void) and segments_info, a list of
        {id, category_id, isthing, area} in id order.

    Example::

        >>> pan, info = panoptic_fusion(torch.zeros(0, 4, 4, dtype=torch.bool), torch.zeros(0), torch.zeros(0),
        ...                             torch.zeros(4, 4, dtype=torch.long), 2, stuff_min_area=1)
        >>> info
        [{'id': 1, 'category_id': 0, 'isthing': False, 'area': 16}]
    """
    if masks.dim() != 3 or semantic.dim() != 2 or masks.shape[1:] != semantic.shape:
        raise ValueError(f"masks must be [K, H, W] and semantic [H, W] of the same size, got "
                         f"{tuple(masks.shape)} and {tuple(semantic.shape)}")
    panoptic = torch.zeros(semantic.shape, dtype=torch.int32, device=semantic.device)
    info: list[dict] = []
    order = torch.argsort(scores, descending=True, stable=True)
    for k in order.tolist():
        if scores[k] < score_thresh:
            break
        mask = masks[k]
        area = int(mask.sum())
        if area == 0:
            continue
        visible = mask & (panoptic == 0)
        n = int(visible.sum())
        if n < overlap_thresh * area:
            continue
        seg = len(info) + 1
        panoptic[visible] = seg
        info.append({"id": seg, "category_id": int(labels[k]), "isthing": True, "area": n})
    free = panoptic == 0
    for c in range(num_stuff_classes):
        region = free & (semantic == c)
        n = int(region.sum())
        if n == 0 or n < stuff_min_area:
            continue
        seg = len(info) + 1
        panoptic[region] = seg
        info.append({"id": seg, "category_id": c, "isthing": False, "area": n})
    return panoptic, info


class AUNet(nn.Module):
    """AUNet (see the module docstring). Train: ``model(images, targets) -> dict of losses``; eval:
    ``model(images) -> list of dicts`` with ``boxes, labels, scores, masks`` (bool [K, H, W]),
    ``semantic`` [H, W], ``panoptic`` [H, W] int32 and ``segments_info``.

    Args:
        num_classes: thing classes (without background).
        num_stuff_classes: stuff classes; the semantic head has one more ("things").
        backbone: resnet18/34/50/101 (torchvision's, ``weights=None``).
        backbone_weights: a local torchvision ResNet checkpoint for the backbone.
        fpn_channels: FPN width (256 in the paper); stuff_channels: width of S_i (256).
        stuff_convs: 3x3 convs per level of the background branch; mask_layers: the mask head's widths.
        representation_size: box head MLP width.
        norm_layer: the backbone's norm (FrozenBatchNorm2d as torchvision's detectors; BatchNorm2d
            to train from scratch).
        trainable_layers: backbone stages trained (None: 3 with backbone_weights, else all 5).
        anchor_sizes: one tuple per level P2..P6.
        min_size, max_size, image_mean, image_std: GeneralizedRCNNTransform's resizing/normalisation.
        rpn_*/box_*: torchvision's MaskRCNN arguments of the same names.
        panoptic_score_thresh, overlap_thresh, stuff_min_area: :func:`panoptic_fusion`'s arguments
            (stuff_min_area in pixels at the input's resolution).
        mam_sampling_ratio: sampling_ratio of the RoIUpsample in the MAM.
    """

    def __init__(self, num_classes: int = 80, num_stuff_classes: int = 53, backbone: str = "resnet50", *,
                 backbone_weights: str | os.PathLike | None = None, fpn_channels: int = 256,
                 stuff_channels: int = 256, stuff_convs: int = 2, mask_layers: Sequence[int] = (256, 256, 256, 256),
                 representation_size: int = 1024, norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
                 trainable_layers: int | None = None,
                 anchor_sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
                 min_size: int = 800, max_size: int = 1333, image_mean: Sequence[float] = (0.485, 0.456, 0.406),
                 image_std: Sequence[float] = (0.229, 0.224, 0.225),
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 panoptic_score_thresh: float = 0.5, overlap_thresh: float = 0.5, stuff_min_area: int = 4096,
                 mam_sampling_ratio: int = 2) -> None:
        super().__init__()
        if backbone not in _RESNETS:
            raise ValueError(f"backbone must be one of {sorted(_RESNETS)}, got {backbone!r}")
        for name, v in (("num_classes", num_classes), ("num_stuff_classes", num_stuff_classes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one tuple per level P2..P6 (5), got {len(anchor_sizes)}")
        self.num_classes, self.num_stuff_classes = num_classes, num_stuff_classes
        self.panoptic_score_thresh, self.overlap_thresh = panoptic_score_thresh, overlap_thresh
        self.stuff_min_area = stuff_min_area

        body = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm_layer)
        body.fc = nn.Identity()  # the classifier is not used (a checkpoint's fc.* is ignored)
        if backbone_weights is not None:
            load_backbone_weights(body, backbone_weights, ignore=("fc.",))
        if trainable_layers is None:
            trainable_layers = 3 if backbone_weights is not None else 5
        trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        for name, p in body.named_parameters():
            if not any(name.startswith(t) for t in trained) and not (trainable_layers == 5 and name.startswith("bn1")):
                p.requires_grad_(False)
        c1 = _RESNETS[backbone]
        self.backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(4)},
                                        [c1, 2 * c1, 4 * c1, 8 * c1], fpn_channels, extra_blocks=LastLevelMaxPool())
        self.transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))

        aspect = ((0.5, 1.0, 2.0),) * len(anchor_sizes)
        anchors = AnchorGenerator(tuple(tuple(a) for a in anchor_sizes), aspect)
        self.rpn = RegionProposalNetwork(
            anchors, _RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]), 0.7, 0.3,
            rpn_batch_size_per_image, 0.5, {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test}, 0.7)

        box_pool = MultiScaleRoIAlign(list(_LEVELS), 7, sampling_ratio=2)
        self.roi_heads = RoIHeads(box_pool, TwoMLPHead(fpn_channels * 49, representation_size),
                                  FastRCNNPredictor(representation_size, num_classes + 1), 0.5, 0.5,
                                  box_batch_size_per_image, 0.25, None, box_score_thresh, box_nms_thresh,
                                  box_detections_per_img)
        self.mask_roi_pool = MultiScaleRoIAlign(list(_LEVELS), 14, sampling_ratio=2)
        self.mask_head = MaskRCNNHeads(fpn_channels, list(mask_layers), 1)
        self.mask_predictor = MaskRCNNPredictor(mask_layers[-1], mask_layers[-1], num_classes + 1)

        n = len(_LEVELS)
        self.stuff_convs = nn.ModuleList(_conv_stack(fpn_channels, stuff_channels, stuff_convs) for _ in range(n))
        self.pam = nn.ModuleList(_Attention(fpn_channels, stuff_channels, 1) for _ in range(n))
        self.mam = nn.ModuleList(_Attention(1, stuff_channels, 3) for _ in range(n))
        # RoIUpsample onto P2..P5 (strides 4..32; the padded batch is a multiple of 32, so exact)
        self.mam_upsample = nn.ModuleList(RoIUpsample(2.0 ** -(i + 2), mam_sampling_ratio, mode="aunet")
                                          for i in range(n))
        self.classifier = nn.Conv2d(stuff_channels, num_stuff_classes + 1, 1)

    # ---- branches ----

    def _foreground(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                    targets: list[dict] | None) -> tuple[dict, list[dict], Tensor, list[Tensor]]:
        """Box and mask heads. Returns (losses, detections, the mask logits of each RoI's class
        [K, 1, 28, 28], their boxes per image): the GT-matched (positive) RoIs in training, the kept
        detections in eval."""
        rh = self.roi_heads
        if self.training:
            proposals, matched_idxs, labels, regression_targets = rh.select_training_samples(proposals, targets)
        box_features = rh.box_head(rh.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = rh.box_predictor(box_features)
        losses: dict[str, Tensor] = {}
        detections: list[dict] = []
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [p[i] for p, i in zip(proposals, pos, strict=True)]
            mask_labels = [lab[i] for lab, i in zip(labels, pos, strict=True)]
            matched = [m[i] for m, i in zip(matched_idxs, pos, strict=True)]
        else:
            mask_boxes, scores, mask_labels = rh.postprocess_detections(class_logits, box_regression, proposals,
                                                                        image_sizes)
            detections = [{"boxes": b, "labels": lab, "scores": s}
                          for b, s, lab in zip(mask_boxes, scores, mask_labels, strict=True)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_sizes)))
        if self.training:
            loss_mask = maskrcnn_loss(mask_logits, mask_boxes, [t["masks"] for t in targets],
                                      [t["labels"] for t in targets], matched)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}
        cls = torch.cat(mask_labels) if mask_labels else mask_logits.new_zeros(0, dtype=torch.long)
        picked = mask_logits[torch.arange(len(cls), device=cls.device), cls].unsqueeze(1)
        return losses, detections, picked, mask_boxes

    def _background(self, features: dict[str, Tensor], rpn_shared: list[Tensor], mask_logits: Tensor,
                    mask_boxes: list[Tensor], padded_size: tuple[int, int]) -> Tensor:
        """Stuff logits [N, num_stuff_classes + 1, H, W] at the padded batch size."""
        n = features[_LEVELS[0]].shape[0]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(mask_boxes)]) \
            if mask_boxes else mask_logits.new_zeros(0, 5)
        p2_size = features[_LEVELS[0]].shape[-2:]
        total = None
        for i, name in enumerate(_LEVELS):
            f = features[name]
            s = self.pam[i](self.stuff_convs[i](f), rpn_shared[i])
            s = self.mam[i](s, self.mam_upsample[i](mask_logits, rois, tuple(f.shape[-2:]), batch_size=n))
            if s.shape[-2:] != p2_size:
                s = F.interpolate(s, size=p2_size, mode="bilinear", align_corners=False)
            total = s if total is None else total + s
        logits = self.classifier(total)
        return F.interpolate(logits, size=padded_size, mode="bilinear", align_corners=False)

    # ---- forward ----

    def _semantic_targets(self, targets: list[dict], image_sizes: list[tuple[int, int]],
                          padded_size: tuple[int, int]) -> Tensor:
        """[N, H, W] semantic targets at the padded batch size: the stuff labels resized (nearest) as
        the images were, pixels of any instance mask -> "things", padding ignored (255)."""
        out = []
        for t, (h, w) in zip(targets, image_sizes, strict=True):
            sem = t["semantic"]
            if sem.dim() != 2:
                raise ValueError(f"targets[i]['semantic'] must be [H, W], got {tuple(sem.shape)}")
            sem = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            if len(t["masks"]):
                sem = torch.where(t["masks"].bool().any(0), self.num_stuff_classes, sem)
            out.append(F.pad(sem, (0, padded_size[1] - w, 0, padded_size[0] - h), value=255))
        return torch.stack(out)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None) -> dict[str, Tensor] | list[dict]:
        if self.training and targets is None:
            raise ValueError("targets must be given in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, targets_t = self.transform(images, targets)
        if targets_t is not None:  # the transform resized boxes and masks but not semantic
            for t, t0 in zip(targets_t, targets, strict=True):
                t["semantic"] = t0["semantic"]
                t["masks"] = t["masks"].to(torch.uint8)
        padded = tuple(image_list.tensors.shape[-2:])
        features = self.backbone(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets_t)
        rpn_shared, self.rpn.head.shared = self.rpn.head.shared, None
        fg_losses, detections, mask_logits, mask_boxes = self._foreground(features, proposals,
                                                                          image_list.image_sizes, targets_t)
        stuff_logits = self._background(features, rpn_shared, mask_logits, mask_boxes, padded)
        if self.training:
            sem_t = self._semantic_targets(targets_t, image_list.image_sizes, padded)
            loss_semantic = F.cross_entropy(stuff_logits, sem_t, ignore_index=255)
            return {**rpn_losses, **fg_losses, "loss_semantic": loss_semantic}

        probs = torch.sigmoid(mask_logits)
        counts = [len(d["boxes"]) for d in detections]
        for d, p in zip(detections, probs.split(counts), strict=True):
            d["masks"] = p
        detections = self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        results = []
        for i, (d, (h, w), orig) in enumerate(zip(detections, image_list.image_sizes, original_sizes, strict=True)):
            logits = stuff_logits[i:i + 1, :, :h, :w]
            semantic = F.interpolate(logits, size=orig, mode="bilinear", align_corners=False)[0].argmax(0)
            masks = d["masks"][:, 0] > 0.5
            panoptic, info = panoptic_fusion(masks, d["scores"], d["labels"], semantic, self.num_stuff_classes,
                                             score_thresh=self.panoptic_score_thresh,
                                             overlap_thresh=self.overlap_thresh, stuff_min_area=self.stuff_min_area)
            results.append({"boxes": d["boxes"], "labels": d["labels"], "scores": d["scores"], "masks": masks,
                            "semantic": semantic, "panoptic": panoptic, "segments_info": info})
        return results


def aunet(num_classes: int = 80, num_stuff_classes: int = 53, backbone: str = "resnet50", **kwargs) -> AUNet:
    """AUNet with the paper's defaults (ResNet-50 + FPN, COCO's 80 thing and 53 stuff classes). Keyword
    arguments: see :class:`AUNet`. No weights are downloaded (``backbone_weights=PATH`` loads a local
    torchvision ResNet checkpoint)."""
    return AUNet(num_classes, num_stuff_classes, backbone, **kwargs)
