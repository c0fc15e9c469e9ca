"""Segmentation metrics: panoptic quality (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

Segments are (panoptic id map, segments_info) pairs as AUNet returns them and COCO panoptic stores
them: an [H, W] integer map (0 = void / unlabeled) and a list of {"id", "category_id", "isthing"}
(optional "iscrowd" for ground truth). A class is the pair (isthing, category_id), so thing and
stuff ids may overlap.

The rules are COCO panoptic's (panopticapi ``pq_compute``): a predicted and a ground-truth segment
of the same class match when IoU > 0.5, where the union leaves out the predicted pixels that lie on
void; unmatched ground truth (not crowd) is a false negative; an unmatched prediction is a false
positive unless more than half of it lies on void or on a crowd region of its class. Per class
PQ = Σ IoU(TP) / (TP + FP/2 + FN/2) = SQ · RQ; the overall figures average the classes that occur
(TP + FP + FN > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["panoptic_quality"]

Segments = tuple[Tensor, Sequence[dict]]


def _key(seg: dict) -> tuple[bool, int]:
    return bool(seg.get("isthing", True)), int(seg["category_id"])


def _image_stats(pred: Segments, gt: Segments, stats: dict) -> None:
    pred_map, pred_info = pred
    gt_map, gt_info = gt
    if pred_map.shape != gt_map.shape or pred_map.dim() != 2:
        raise ValueError(f"panoptic maps must be [H, W] of the same size, got {tuple(pred_map.shape)} and "
                         f"{tuple(gt_map.shape)}")
    pred_map, gt_map = pred_map.long().flatten(), gt_map.long().flatten()
    pred_segs = {int(s["id"]): s for s in pred_info}
    gt_segs = {int(s["id"]): s for s in gt_info}
    for name, segs, m in (("prediction", pred_segs, pred_map), ("ground truth", gt_segs, gt_map)):
        ids = set(torch.unique(m).tolist()) - {0}
        if not ids <= set(segs):
            raise ValueError(f"{name} map has ids {sorted(ids - set(segs))} missing from its segments_info")
        if 0 in segs:
            raise ValueError(f"{name} segments_info uses id 0, which is void")
    # Joint histogram of (gt id, pred id) over all pixels.
    n_pred = max(pred_segs, default=0) + 1
    pairs, counts = torch.unique(gt_map * n_pred + pred_map, return_counts=True)
    inter = {(int(p) // n_pred, int(p) % n_pred): int(c) for p, c in zip(pairs, counts, strict=True)}
    area_gt = {g: int((gt_map == g).sum()) for g in gt_segs}
    area_pred = {p: int((pred_map == p).sum()) for p in pred_segs}

    gt_matched, pred_matched = set(), set()
    for (g, p), n in inter.items():
        if g == 0 or p == 0:
            continue
        gs, ps = gt_segs[g], pred_segs[p]
        if gs.get("iscrowd", 0) or _key(gs) != _key(ps):
            continue
        union = area_pred[p] + area_gt[g] - n - inter.get((0, p), 0)
        iou = n / union
        if iou > 0.5:
            s = stats.setdefault(_key(gs), [0, 0, 0, 0.0])
            s[0] += 1
            s[3] += iou
            gt_matched.add(g)
            pred_matched.add(p)
    crowd_by_class: dict[tuple[bool, int], set[int]] = {}
    for g, gs in gt_segs.items():
        if gs.get("iscrowd", 0):
            crowd_by_class.setdefault(_key(gs), set()).add(g)
        elif g not in gt_matched:
            stats.setdefault(_key(gs), [0, 0, 0, 0.0])[2] += 1
    for p, ps in pred_segs.items():
        if p in pred_matched or area_pred[p] == 0:
            continue
        ignored = inter.get((0, p), 0) + sum(inter.get((g, p), 0) for g in crowd_by_class.get(_key(ps), ()))
        if ignored / area_pred[p] > 0.5:
            continue
        stats.setdefault(_key(ps), [0, 0, 0, 0.0])[1] += 1


def _summary(tp: int, fp: int, fn: int, iou: float) -> dict[str, float]:
    denom = tp + 0.5 * fp + 0.5 * fn
    sq = iou / tp if tp else 0.0
    rq = tp / denom if denom else 0.0
    return {"pq": sq * rq, "sq": sq, "rq": rq, "tp": tp, "fp": fp, "fn": fn}


def _average(rows: list[dict]) -> dict[str, float]:
    n = len(rows)
    return {k: sum(r[k] for r in rows) / n if n else 0.0 for k in ("pq", "sq", "rq")} | {"n": n}


def panoptic_quality(predictions: Sequence[Segments], ground_truths: Sequence[Segments]) -> dict:
    """PQ, SQ and RQ over a set of images.

    Args:
        predictions, ground_truths: per image a (panoptic [H, W] int map, segments_info) pair; 0 is void.

    Returns:
        ``{"pq", "sq", "rq", "n"}`` over all classes, the same under ``"things"`` and ``"stuff"``, and
        ``"per_class": {(isthing, category_id): {"pq", "sq", "rq", "tp", "fp", "fn"}}``.

    Example::

        >>> gt = (torch.tensor([[1, 1], [2, 2]]), [{"id": 1, "category_id": 3, "isthing": True},
        ...                                         {"id": 2, "category_id": 0, "isthing": False}])
        >>> panoptic_quality([gt], [gt])["pq"]
        1.0
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(f"{len(predictions)} predictions but {len(ground_truths)} ground truths")
    stats: dict[tuple[bool, int], list] = {}
    for pred, gt in zip(predictions, ground_truths, strict=True):
        _image_stats(pred, gt, stats)
    per_class = {k: _summary(*v) for k, v in sorted(stats.items())}
    rows = list(per_class.values())
    return {**_average(rows),
            "things": _average([r for k, r in per_class.items() if k[0]]),
            "stuff": _average([r for k, r in per_class.items() if not k[0]]),
            "per_class": per_class}
