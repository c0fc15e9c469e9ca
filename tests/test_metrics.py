"""fastseg.metrics.panoptic_quality on hand-made cases whose PQ/SQ/RQ are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from fastseg.metrics import panoptic_quality

THING = {"isthing": True}
STUFF = {"isthing": False}


def seg(i, cat, kind, **kw):
    return {"id": i, "category_id": cat, **kind, **kw}


def test_perfect_prediction():
    pan = torch.tensor([[1, 1, 2], [3, 3, 2], [3, 3, 0]])
    info = [seg(1, 4, THING), seg(2, 4, THING), seg(3, 0, STUFF)]
    r = panoptic_quality([(pan, info)], [(pan, info)])
    assert (r["pq"], r["sq"], r["rq"], r["n"]) == (1.0, 1.0, 1.0, 2)
    assert r["per_class"][(True, 4)]["tp"] == 2


def test_partial_overlaps_by_hand():
    """Thing: IoU 8/10 (TP); stuff: IoU 6/8 (TP). PQ = (0.8 + 0.75) / 2; same ids in both spaces."""
    gt = torch.tensor([[1] * 4, [1] * 4, [2] * 4, [2] * 4])
    pred = torch.tensor([[5] * 4, [5] * 4, [5, 5, 6, 6], [6] * 4])
    r = panoptic_quality([(pred, [seg(5, 1, THING), seg(6, 1, STUFF)])],
                         [(gt, [seg(1, 1, THING), seg(2, 1, STUFF)])])
    assert r["per_class"][(True, 1)]["sq"] == pytest.approx(0.8)
    assert r["per_class"][(False, 1)]["pq"] == pytest.approx(0.75)
    assert r["pq"] == pytest.approx(0.775)
    assert r["things"]["pq"] == pytest.approx(0.8) and r["stuff"]["pq"] == pytest.approx(0.75)


def test_void_is_left_out_of_the_union():
    """The prediction spreads over void pixels: those are not counted against it (IoU 1)."""
    gt = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]])
    pred = torch.ones(2, 4, dtype=torch.long) * 7
    r = panoptic_quality([(pred, [seg(7, 2, THING)])], [(gt, [seg(1, 2, THING)])])
    assert r["pq"] == pytest.approx(1.0)


def test_false_positives_false_negatives_and_threshold():
    """IoU exactly 0.5 is no match: one FP and one FN, RQ 0. A prediction of a class absent from the
    ground truth counts as FP unless more than half of it lies on void."""
    gt = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    pred = torch.tensor([[3, 4, 4, 4], [3, 5, 5, 5]])  # 3: IoU 1/3 with gt 1; 5: on void; 4: 2/3 void
    info = [seg(3, 2, THING), seg(4, 9, THING), seg(5, 8, STUFF)]
    r = panoptic_quality([(pred, info)], [(gt, [seg(1, 2, THING)])])
    pc = r["per_class"]
    assert (pc[(True, 2)]["tp"], pc[(True, 2)]["fp"], pc[(True, 2)]["fn"]) == (0, 1, 1)
    assert (True, 9) not in pc and (False, 8) not in pc  # mostly on void: ignored
    assert r["pq"] == 0.0 and r["n"] == 1
    # exactly 0.5: [1 1] vs [1 1 1 1] -> IoU 2/4
    gt = torch.tensor([[1, 1, 2, 2]])
    pred = torch.tensor([[3, 3, 3, 3]])
    r = panoptic_quality([(pred, [seg(3, 1, THING)])], [(gt, [seg(1, 1, THING), seg(2, 0, STUFF)])])
    assert r["per_class"][(True, 1)]["tp"] == 0 and r["per_class"][(True, 1)]["fn"] == 1


def test_crowd_regions_and_several_images():
    """A crowd ground-truth region is neither FN nor a source of FP for predictions of its class lying
    on it; classes accumulate over images (PQ = (0.9 + 0) / (1 + 0.5 + 0.5))."""
    gt = torch.tensor([[1, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 3, 3]])
    r = panoptic_quality([(pred, [seg(3, 5, THING)])], [(gt, [seg(1, 5, THING), seg(2, 5, THING, iscrowd=1)])])
    assert r["per_class"][(True, 5)] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 1}
    gt2 = torch.tensor([[1] * 9 + [0]])
    pred2 = torch.tensor([[1] * 10])
    gt3 = torch.tensor([[1, 1]])
    pred3 = torch.tensor([[2, 2]])
    r = panoptic_quality([(pred2, [seg(1, 5, THING)]), (pred3, [seg(2, 6, THING)])],
                         [(gt2, [seg(1, 5, THING)]), (gt3, [seg(1, 5, THING)])])
    assert r["per_class"][(True, 5)]["pq"] == pytest.approx(1.0 / 1.5)  # TP (IoU 1: void left out), FN
    assert r["per_class"][(True, 6)]["fp"] == 1


def test_bad_input():
    pan = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="missing from its segments_info"):
        panoptic_quality([(pan, [seg(1, 0, STUFF)])], [(pan, [seg(1, 0, STUFF), seg(2, 0, STUFF)])])
    with pytest.raises(ValueError, match="same size"):
        panoptic_quality([(pan, [])], [(pan.T, [])])
    with pytest.raises(ValueError, match="predictions"):
        panoptic_quality([], [(pan, [])])
