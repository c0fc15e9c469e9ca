"""fastseg.ops.matrix_nms / matrix_nms_batched / matrix_nms_boxes against a float64 formulation of
mmdet's mask_matrix_nms written here, on random, heavily overlapping masks."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch

from fastseg import ops
from fastseg.ops import nms

BACKENDS = ["reference", "cpu"]


@dataclass(frozen=True)
class Case:
    n: int
    classes: int
    h: int = 37
    w: int = 41  # H*W = 1517: not a multiple of 64
    kernel: str = "gaussian"
    sigma: float = 2.0
    filter_thr: float = -1
    nms_pre: int = -1
    max_num: int = -1
    area: bool = False

    def __str__(self) -> str:
        extra = "".join(f"_{k}{v}" for k, v in (("thr", self.filter_thr), ("pre", self.nms_pre), ("max", self.max_num))
                        if v > 0)
        return (f"n{self.n}_c{self.classes}_{self.h}x{self.w}_{self.kernel}{self.sigma:g}{extra}"
                f"{'_area' if self.area else ''}")


CASES = [
    Case(1, 1),
    Case(2, 1, kernel="linear"),
    Case(17, 1, sigma=0.5),
    Case(60, 3, kernel="linear", filter_thr=0.1),
    Case(150, 5, nms_pre=100, max_num=40),
    Case(150, 1, kernel="linear", sigma=0.5, filter_thr=0.05, nms_pre=120, max_num=50, area=True),
    Case(600, 1, h=23, w=29),
    Case(600, 80, h=23, w=29, filter_thr=0.05, max_num=100),
]
IDS = [str(c) for c in CASES]


def sample(case: Case, dtype=torch.bool):
    """Masks = a few base shapes with noise (heavy overlap, exact duplicates possible); ties in scores."""
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    base = torch.rand(max(2, case.n // 6), case.h, case.w, generator=g) > torch.rand(max(2, case.n // 6), 1, 1,
                                                                                   generator=g)
    pick = torch.randint(0, len(base), (case.n,), generator=g)
    masks = base[pick] ^ (torch.rand(case.n, case.h, case.w, generator=g) > 0.93)
    labels = torch.randint(0, case.classes, (case.n,), generator=g)
    scores = (torch.rand(case.n, generator=g) * 20).round() / 20  # ties
    area = masks.sum((1, 2)).double() * (1 + 0.1 * torch.rand(case.n, generator=g, dtype=torch.float64)) \
        if case.area else None
    return masks.to(dtype), labels, scores, area


def mmdet_float64(masks, labels, scores, *, kernel, sigma, filter_thr, nms_pre, max_num, mask_area=None):
    """mmdet's mask_matrix_nms in float64 (stable sorts: ties by input index; 0/0 cases defined as in
    fastseg's docs: an empty union gives IoU 0, a fully suppressed mask applies no decay)."""
    if len(labels) == 0:
        return scores[:0], labels[:0], masks[:0], labels[:0]
    masks = masks > 0.5 if masks.is_floating_point() else masks.bool()
    area = masks.sum((1, 2)).double() if mask_area is None else mask_area.double()
    order = torch.sort(scores, descending=True, stable=True).indices
    if nms_pre > 0:
        order = order[:nms_pre]
    n = len(order)
    flat = masks[order].reshape(n, -1).double()
    inter = flat @ flat.T
    a = area[order].expand(n, n)
    union = a + a.T - inter
    iou = torch.where(union > 0, inter / union, torch.zeros_like(union)).triu(diagonal=1)
    lab = labels[order].expand(n, n)
    same = (lab == lab.T).triu(diagonal=1)
    decay_iou = iou * same
    comp = decay_iou.max(0).values.expand(n, n).T
    if kernel == "gaussian":
        num, den = torch.exp(-sigma * decay_iou ** 2), torch.exp(-sigma * comp ** 2)
    else:
        num, den = 1 - decay_iou, 1 - comp
    decay = torch.where(den > 0, num / den, torch.ones_like(num)).min(0).values
    new = (scores[order].double() * decay).to(scores.dtype)
    keep_inds = order
    if filter_thr > 0:
        keep = new >= filter_thr
        new, keep_inds = new[keep], keep_inds[keep]
    by_index = torch.argsort(keep_inds)
    new, keep_inds = new[by_index], keep_inds[by_index]
    final = torch.sort(new, descending=True, stable=True).indices
    if max_num > 0:
        final = final[:max_num]
    keep_inds = keep_inds[final]
    return new[final], labels[keep_inds], masks[keep_inds], keep_inds


def _kw(case: Case):
    return {"kernel": case.kernel, "sigma": case.sigma, "filter_thr": case.filter_thr, "nms_pre": case.nms_pre,
            "max_num": case.max_num}


def _assert_same(got, want):
    scores, labels, masks, keep = got
    torch.testing.assert_close(scores, want[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(keep, want[3]), "keep_inds differ"
    assert torch.equal(labels, want[1]) and torch.equal(masks.bool(), want[2].bool())


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_float64_mmdet(backend, case):
    masks, labels, scores, area = sample(case)
    got = ops.matrix_nms(masks, labels, scores, **_kw(case), mask_area=area, backend=backend)
    want = mmdet_float64(masks, labels, scores, **_kw(case), mask_area=area)
    _assert_same(got, want)
    assert got[2].dtype == masks.dtype and got[3].dtype == torch.long


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_values(backend):
    """The decay itself, not only the decisions: scores to float64 rounding."""
    case = Case(200, 2, sigma=0.5)
    masks, labels, _, _ = sample(case)
    scores = torch.rand(case.n, dtype=torch.float64)
    got = ops.matrix_nms(masks, labels, scores, **_kw(case), backend=backend)
    want = mmdet_float64(masks, labels, scores, **_kw(case))
    torch.testing.assert_close(got[0], want[0], atol=1e-14, rtol=1e-13)
    assert torch.equal(got[3], want[3])
    assert (got[0] < scores[got[3]]).any()  # something was decayed


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_and_float_masks(backend, dtype):
    case = CASES[3]
    masks, labels, scores, _ = sample(case)
    soft = masks.to(dtype) if dtype == torch.uint8 else masks.float() * 0.4 + 0.3  # 0.3 / 0.7 around 0.5
    got = ops.matrix_nms(soft, labels, scores, **_kw(case), backend=backend)
    want = mmdet_float64(masks, labels, scores, **_kw(case))
    assert torch.equal(got[3], want[3])
    assert got[2].dtype == dtype and torch.equal(got[2], soft[got[3]])


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_identical_masks(backend, kernel):
    masks = (torch.rand(1, 19, 23) > 0.5).expand(9, -1, -1).clone()
    scores = torch.linspace(1.0, 0.2, 9)
    got = ops.matrix_nms(masks, torch.zeros(9, dtype=torch.long), scores, kernel=kernel, backend=backend)
    want = mmdet_float64(masks, torch.zeros(9, dtype=torch.long), scores, kernel=kernel, sigma=2.0, filter_thr=-1,
                         nms_pre=-1, max_num=-1)
    _assert_same(got, want)
    assert got[3][0] == 0 and got[0][0] == 1.0  # the top mask keeps its score
    if kernel == "linear":
        assert (got[0][1:] == 0).all()  # duplicates of it are fully suppressed


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_masks_and_empty_input(backend):
    masks = torch.zeros(4, 5, 7, dtype=torch.bool)  # empty masks: IoU 0, nothing decays
    scores = torch.tensor([0.9, 0.5, 0.7, 0.1])
    got = ops.matrix_nms(masks, torch.zeros(4, dtype=torch.long), scores, backend=backend)
    assert torch.equal(got[3], torch.tensor([0, 2, 1, 3])) and torch.equal(got[0], scores[got[3]])
    out = ops.matrix_nms(masks[:0], torch.zeros(0, dtype=torch.long), scores[:0], backend=backend)
    assert [t.shape[0] for t in out] == [0, 0, 0, 0] and out[2].shape == (0, 5, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_per_image(backend):
    cases = [CASES[3], Case(0, 3), Case(40, 1, kernel="linear"), CASES[4]]
    samples = [sample(Case(c.n, c.classes)) for c in cases]
    kw = {"kernel": "gaussian", "sigma": 2.0, "filter_thr": 0.05, "nms_pre": 50, "max_num": 30}
    got = ops.matrix_nms_batched([s[0] for s in samples], [s[1] for s in samples], [s[2] for s in samples], **kw,
                                 backend=backend)
    for g, s in zip(got, samples, strict=True):
        _assert_same(g, ops.matrix_nms(s[0], s[1], s[2], **kw, backend=backend))
    # The single-call path (used on GPUs; CPU loops over images to spare the concatenated copy).
    one = nms._batched_one_call([s[0] for s in samples], [s[0] for s in samples], [s[1] for s in samples],
                                [s[2] for s in samples], None, "gaussian", 2.0, 0.05, 50, 30, backend)
    for g, s in zip(one, samples, strict=True):
        _assert_same(g, ops.matrix_nms(s[0], s[1], s[2], **kw, backend=backend))
    mixed = [samples[0], sample(Case(9, 2, h=11, w=13))]  # different sizes: per-image calls
    got = ops.matrix_nms_batched([s[0] for s in mixed], [s[1] for s in mixed], [s[2] for s in mixed],
                                 backend=backend)
    for g, s in zip(got, mixed, strict=True):
        _assert_same(g, ops.matrix_nms(s[0], s[1], s[2], backend=backend))


def _boxes(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60
    size = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 1
    return torch.cat([centre, centre + size], 1)


def _box_iou64(b):
    lt, rb = torch.maximum(b[:, None, :2], b[None, :, :2]), torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    area = (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area[:, None] + area[None, :] - inter)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_boxes(backend, kernel):
    n = 300
    boxes, labels = _boxes(n, 3).float(), torch.randint(0, 4, (n,))
    scores = torch.rand(n)
    got = ops.matrix_nms_boxes(boxes, labels, scores, kernel=kernel, filter_thr=0.05, max_num=100, backend=backend)
    # float64 formulation with box IoU (pixel-free masks: the same decay as the mask form)
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = _box_iou64(boxes[order].double()).triu(1) * (labels[order, None] == labels[None, order]).triu(1)
    comp = iou.max(0).values
    f = (lambda x: torch.exp(-2.0 * x ** 2)) if kernel == "gaussian" else (lambda x: 1 - x)
    decay = (f(iou) / f(comp)[:, None]).min(0).values
    new = (scores[order].double() * decay).float()
    keep = new >= 0.05
    kept, new = order[keep], new[keep]
    idx = torch.argsort(kept)
    kept, new = kept[idx], new[idx]
    final = torch.sort(new, descending=True, stable=True).indices[:100]
    assert torch.equal(got[3], kept[final])
    torch.testing.assert_close(got[0], new[final])
    assert torch.equal(got[2], boxes[kept[final]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    masks, labels, scores, _ = sample(CASES[6])
    runs = [ops.matrix_nms(masks, labels, scores, backend=backend) for _ in range(3)]
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][3], r[3]) for r in runs[1:])


def test_backends_agree_on_keep_inds():
    for case in CASES:
        masks, labels, scores, area = sample(case)
        results = [ops.matrix_nms(masks, labels, scores, **_kw(case), mask_area=area, backend=b) for b in BACKENDS]
        assert all(torch.equal(results[0][3], r[3]) and torch.equal(results[0][0], r[0]) for r in results[1:])


def _bad(**kw):
    args = {"masks": torch.zeros(3, 4, 5, dtype=torch.bool), "labels": torch.zeros(3, dtype=torch.long),
            "scores": torch.rand(3)}
    args.update(kw)
    masks, labels, scores = args.pop("masks"), args.pop("labels"), args.pop("scores")
    return lambda: ops.matrix_nms(masks, labels, scores, **args)


BAD = [
    ("nan scores", _bad(scores=torch.tensor([0.5, float("nan"), 0.1])), "NaN"),
    ("sigma 0", _bad(sigma=0.0), "sigma"),
    ("sigma negative", _bad(sigma=-1.0), "sigma"),
    ("unknown kernel", _bad(kernel="box"), "kernel"),
    ("labels length", _bad(labels=torch.zeros(2, dtype=torch.long)), "labels"),
    ("scores length", _bad(scores=torch.rand(4)), "scores"),
    ("float labels", _bad(labels=torch.zeros(3)), "labels"),
    ("masks rank", _bad(masks=torch.zeros(3, 20, dtype=torch.bool)), "masks"),
    ("mask_area shape", _bad(mask_area=torch.ones(2)), "mask_area"),
    ("boxes shape", lambda: ops.matrix_nms_boxes(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), torch.rand(3)),
     "boxes"),
    ("batch lengths", lambda: ops.matrix_nms_batched([torch.zeros(1, 2, 2, dtype=torch.bool)], [], []), "lists"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _decay(masks=None, labels=None, order=None, area=None, kernel="gaussian", sigma=2.0):
    masks = torch.zeros(3, 4, 5, dtype=torch.bool) if masks is None else masks
    labels = torch.zeros(3, dtype=torch.long) if labels is None else labels
    order = torch.arange(3) if order is None else order
    return lambda: torch.ops.fastseg.matrix_nms_decay(masks, labels, order, area, kernel, sigma)


DIRECT_BAD = [
    ("float masks", _decay(masks=torch.zeros(3, 4, 5)), "bool or uint8"),
    ("order out of range", _decay(order=torch.tensor([0, 3])), "order"),
    ("order dtype", _decay(order=torch.tensor([0, 1], dtype=torch.int32)), "order"),
    ("labels length", _decay(labels=torch.zeros(2, dtype=torch.long)), "labels"),
    ("kernel", _decay(kernel="nope"), "kernel"),
    ("sigma", _decay(sigma=0.0), "sigma"),
    ("area", _decay(area=torch.ones(4)), "mask_area"),
]


@pytest.mark.parametrize("name,call,match", DIRECT_BAD, ids=[b[0] for b in DIRECT_BAD])
def test_bad_input_direct(name, call, match):
    """Callers of torch.ops.fastseg.* skip the Python checks: the C++ ones must catch these."""
    with pytest.raises(RuntimeError, match=match):
        call()


def test_opcheck():
    masks, labels, scores, area = sample(CASES[5])
    order = torch.sort(scores, descending=True, stable=True).indices[:100]
    torch.library.opcheck(torch.ops.fastseg.matrix_nms_decay, (masks, labels, order, area, "linear", 0.5))
    boxes = _boxes(50, 1)
    torch.library.opcheck(torch.ops.fastseg.matrix_nms_boxes_decay,
                          (boxes, torch.randint(0, 3, (50,)), torch.randperm(50), "gaussian", 2.0))


# ---- GPU (skipped with a reason when no GPU is present) ----

GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_float64_mmdet(backend, case):
    masks, labels, scores, area = sample(case)
    want = mmdet_float64(masks, labels, scores, **_kw(case), mask_area=area)
    got = ops.matrix_nms(masks.cuda(), labels.cuda(), scores.cuda(), **_kw(case),
                         mask_area=None if area is None else area.cuda(), backend=backend)
    _assert_same([t.cpu() for t in got], want)


@pytest.mark.gpu
def test_gpu_batched_and_boxes():
    samples = [sample(Case(n, 4)) for n in (30, 0, 120)]
    got = ops.matrix_nms_batched([s[0].cuda() for s in samples], [s[1].cuda() for s in samples],
                                 [s[2].cuda() for s in samples], backend="cuda")
    for g, s in zip(got, samples, strict=True):
        _assert_same([t.cpu() for t in g], ops.matrix_nms(s[0], s[1], s[2], backend="cpu"))
    boxes, labels, scores = _boxes(200, 5), torch.randint(0, 3, (200,)), torch.rand(200)
    want = ops.matrix_nms_boxes(boxes, labels, scores, backend="cpu")
    got = ops.matrix_nms_boxes(boxes.cuda(), labels.cuda(), scores.cuda(), backend="cuda")
    _assert_same([t.cpu() for t in got], want)
