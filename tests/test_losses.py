"""fastseg.losses: U-Net's weight map (hand-computed and brute-force references), the weighted
cross entropy (float64 reference, gradcheck) and PSPNet's main + auxiliary loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastseg.losses import aux_loss, unet_weight_map, weighted_cross_entropy

# ----------------------------------------------------------------------------- unet_weight_map


def test_weight_map_hand_computed_row():
    # cells at x = 0 and x = 4, gap of three background pixels; 2 cell px, 3 background px of 5
    w = unet_weight_map(torch.tensor([[1, 0, 0, 0, 2]]), w0=10, sigma=5).double()
    wc_cell, wc_bg = 5 / (2 * 2), 5 / (2 * 3)
    gap = wc_bg + 10 * math.exp(-(4**2) / (2 * 25))  # d1 + d2 = 1 + 3 = 2 + 2 = 4
    torch.testing.assert_close(w, torch.tensor([[wc_cell, gap, gap, gap, wc_cell]], dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_weight_map_hand_computed_diagonal():
    # 3×3, one-pixel cells at (0, 0) and (2, 2): Euclidean, not city-block, distances
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 2]])
    w = unet_weight_map(labels, w0=2.0, sigma=3.0).double()
    wc_cell, wc_bg = 9 / 4, 9 / 14
    term = lambda d12: 2.0 * math.exp(-(d12**2) / 18)  # noqa: E731
    want = torch.tensor([
        [wc_cell, wc_bg + term(1 + math.sqrt(5)), wc_bg + term(4)],
        [wc_bg + term(1 + math.sqrt(5)), wc_bg + term(2 * math.sqrt(2)), wc_bg + term(1 + math.sqrt(5))],
        [wc_bg + term(4), wc_bg + term(1 + math.sqrt(5)), wc_cell],
    ], dtype=torch.float64)
    torch.testing.assert_close(w, want, rtol=1e-6, atol=0)


def _brute_force(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    ids = [i for i in np.unique(labels) if i > 0]
    fg = labels > 0
    n = labels.size
    wc = np.where(fg, n / (2 * fg.sum()), n / (2 * (n - fg.sum())))
    out = wc.astype(np.float64)
    if len(ids) < 2:
        return out
    pts = {i: np.argwhere(labels == i) for i in ids}
    for y, x in np.argwhere(~fg):
        d = sorted(np.sqrt(((pts[i] - (y, x)) ** 2).sum(1)).min() for i in ids)
        out[y, x] += w0 * math.exp(-((d[0] + d[1]) ** 2) / (2 * sigma**2))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_map_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(13, 17, dtype=torch.long)
    for k in range(1, 5):  # four rectangles, possibly touching
        y, x = torch.randint(0, 10, (1,), generator=g).item(), torch.randint(0, 13, (1,), generator=g).item()
        labels[y:y + 3, x:x + 4] = k
    want = _brute_force(labels.numpy(), 10.0, 5.0)
    torch.testing.assert_close(unet_weight_map(labels).double(), torch.from_numpy(want), rtol=1e-6, atol=0)
    # the same cells as a [K, H, W] stack of masks
    stack = torch.stack([labels == k for k in labels.unique() if k > 0])
    torch.testing.assert_close(unet_weight_map(stack), unet_weight_map(labels))
    torch.testing.assert_close(unet_weight_map(labels.numpy()), unet_weight_map(labels))


def test_weight_map_fewer_than_two_cells_and_class_weights():
    one = torch.zeros(4, 6, dtype=torch.long)
    one[1:3, 1:3] = 7
    torch.testing.assert_close(unet_weight_map(one), torch.where(one > 0, 24 / 8, 24 / 40).float())
    torch.testing.assert_close(unet_weight_map(torch.zeros(3, 5, dtype=torch.long)), torch.ones(3, 5))
    w = unet_weight_map(torch.tensor([[1, 0, 2]]), w0=1.0, sigma=1.0, class_weights=(0.5, 2.0))
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5 + math.exp(-2.0), 2.0]]))
    assert unet_weight_map(one).dtype == torch.float32


def test_weight_map_bad_input():
    labels = torch.tensor([[1, 0, 2]])
    with pytest.raises(ValueError, match="sigma"):
        unet_weight_map(labels, sigma=0)
    with pytest.raises(ValueError, match="w0"):
        unet_weight_map(labels, w0=-1)
    with pytest.raises(ValueError, match="instance_masks"):
        unet_weight_map(torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError, match="instance_masks"):
        unet_weight_map(torch.rand(4, 4))  # float label image
    with pytest.raises(ValueError, match="instance_masks"):
        unet_weight_map(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="instance_masks"):
        unet_weight_map(torch.full((2, 3, 3), 2))
    with pytest.raises(ValueError, match="class_weights"):
        unet_weight_map(labels, class_weights=(1.0,))


# ----------------------------------------------------------------------------- weighted_cross_entropy


def _wce_reference(logits, target, weight, ignore_index=None):
    logp = torch.log_softmax(logits.double(), dim=1)
    safe = target.clamp(0, logits.shape[1] - 1)
    nll = -logp.gather(1, safe[:, None])[:, 0]
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    return (nll * weight.double() * keep), keep


def test_weighted_cross_entropy_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, generator=g)
    target = torch.randint(0, 3, (2, 5, 7), generator=g)
    weight = torch.rand(2, 5, 7, generator=g) * 5
    ref, _ = _wce_reference(logits, target, weight)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight).double(), ref.mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight, reduction="sum").double(), ref.sum(),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight, reduction="none").double(), ref,
                               rtol=1e-5, atol=1e-7)
    # a weight map of ones is plain cross entropy; an [H, W] map is shared over the batch
    plain = F.cross_entropy(logits, target)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, torch.ones(5, 7)), plain)
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight[0]),
                               weighted_cross_entropy(logits, target, weight[0].expand(2, 5, 7)))


def test_weighted_cross_entropy_ignore_index_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (1, 3, 5), generator=g)
    target[0, 0, :3] = 255
    weight = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    ref, keep = _wce_reference(logits, target, weight, 255)
    got = weighted_cross_entropy(logits, target, weight, ignore_index=255)
    torch.testing.assert_close(got, ref.sum() / keep.sum(), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(
        lambda z: weighted_cross_entropy(z, target, weight, ignore_index=255), (logits,))


def test_weighted_cross_entropy_bad_input():
    logits, target = torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight_map"):
        weighted_cross_entropy(logits, target, torch.ones(3, 3))
    with pytest.raises(ValueError, match="target"):
        weighted_cross_entropy(logits, target.float(), torch.ones(4, 4))
    with pytest.raises(ValueError, match="target"):
        weighted_cross_entropy(logits, torch.zeros(1, 6, 6, dtype=torch.long), torch.ones(6, 6))
    with pytest.raises(ValueError, match="logits"):
        weighted_cross_entropy(logits[0], target, torch.ones(4, 4))
    with pytest.raises(ValueError, match="reduction"):
        weighted_cross_entropy(logits, target, torch.ones(4, 4), reduction="max")


# ----------------------------------------------------------------------------- aux_loss


def test_aux_loss_main_plus_weighted_aux():
    g = torch.Generator().manual_seed(2)
    out, aux = torch.randn(2, 5, 9, 11, generator=g), torch.randn(2, 5, 9, 11, generator=g)
    target = torch.randint(0, 5, (2, 9, 11), generator=g)
    target[:, :2] = 255
    want = F.cross_entropy(out, target, ignore_index=255) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)
    torch.testing.assert_close(aux_loss({"out": out, "aux": aux}, target), want)
    torch.testing.assert_close(aux_loss({"out": out, "aux": aux}, target, aux_weight=1.0),
                               F.cross_entropy(out, target, ignore_index=255) + F.cross_entropy(aux, target,
                                                                                                ignore_index=255))
    torch.testing.assert_close(aux_loss({"out": out}, target), F.cross_entropy(out, target, ignore_index=255))


def test_aux_loss_resizes_low_resolution_aux_and_handles_all_ignored():
    g = torch.Generator().manual_seed(3)
    out, aux = torch.randn(1, 3, 16, 12, generator=g), torch.randn(1, 3, 4, 3, generator=g)
    target = torch.randint(0, 3, (1, 16, 12), generator=g)
    up = F.interpolate(aux, size=(16, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aux_loss({"out": out, "aux": aux}, target),
                               F.cross_entropy(out, target) + 0.4 * F.cross_entropy(up, target))
    out.requires_grad_(True)
    loss = aux_loss({"out": out, "aux": aux}, torch.full((1, 16, 12), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(out.grad).all()


def test_aux_loss_bad_input():
    out, target = torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="outputs"):
        aux_loss({"aux": out}, target)
    with pytest.raises(ValueError, match="aux_weight"):
        aux_loss({"out": out}, target, aux_weight=-0.4)
    with pytest.raises(ValueError, match="target"):
        aux_loss({"out": out}, target[0])
    with pytest.raises(ValueError, match=r"outputs\['aux'\]"):
        aux_loss({"out": out, "aux": out[0]}, target)
