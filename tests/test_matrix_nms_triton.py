"""Triton backend of the Matrix NMS decay under TRITON_INTERPRET=1 (CPU tensors), against the float64
reference ``_reference.matrix_nms_decay`` (and the CPU kernel when the extension is built): random,
heavily overlapping masks, one or several classes, both kernels, sigma 0.5 and 2, given areas, H*W not
a multiple of 32, order a permutation or a prefix (nms_pre), identical and empty masks, n = 0 and 1,
the default blocks (one tile), 16-wide blocks with a 3-way K split (many tiles, skipped cross-label
tiles, int32 atomics) and the same tiles on the large-n path (no n x n buffer); then the public
``fastseg.ops.matrix_nms(..., backend="triton")``, strided and uint8 masks, determinism and bad arguments.

Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_matrix_nms_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from fastseg import _extension, ops
from fastseg.ops import _reference, nms

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]

# 16-wide tiles over 32 pixels, 3 K splits: several tiles and atomic partial sums on tiny shapes.
SMALL = dict(BLOCK=16, BLOCK_K=32, SPLIT_K=3, WARPS=4, STAGES=1, COL_P=16, COL_Q=16)
# The same tiles through the large-n path (no n x n buffer: atomic min/max of order keys per column).
FUSED = dict(SMALL, FUSED=True)
BLOCKS = {"default": None, "small": SMALL, "fused": FUSED}
RTOL, ATOL = 1e-12, 1e-14  # against the float64 reference (same math, other rounding order)


@dataclass(frozen=True)
class Case:
    n: int
    classes: int
    h: int
    w: int
    sigma: float = 2.0
    area: bool = False  # mask_area given (pixel counts times 1 + U(0, 0.1))
    order: str = "perm"  # "perm": all masks in a random order; "prefix": the first 3/4 of one (nms_pre)
    identical: bool = False  # every mask the same
    empty: bool = False  # some masks empty (union 0 between two of them)

    def __str__(self) -> str:
        flags = "".join(f"_{k}" for k in ("area", "identical", "empty") if getattr(self, k))
        return f"n{self.n}_c{self.classes}_{self.h}x{self.w}_s{self.sigma:g}_{self.order}{flags}"


# H*W in {1, 35, 63, 143, 323, 400}: never a multiple of 32.
CASES = [
    Case(1, 1, 7, 9),
    Case(2, 1, 5, 7),
    Case(7, 1, 13, 11, sigma=0.5),
    Case(7, 3, 7, 9, area=True, order="prefix"),
    Case(33, 1, 17, 19),
    Case(33, 4, 11, 13, sigma=0.5, area=True, order="prefix"),
    Case(33, 1, 7, 9, identical=True),
    Case(33, 2, 5, 7, empty=True),
    Case(40, 5, 20, 20, sigma=0.5),
    Case(33, 33, 11, 13),  # every mask its own class: nothing decays
    Case(9, 2, 1, 1, order="prefix"),
]
IDS = [str(c) for c in CASES]


def sample(case: Case, dtype: torch.dtype = torch.bool):
    """(masks, labels, order, mask_area): a few base shapes with noise (heavy overlap, exact duplicates
    possible), int32 labels."""
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    nb = max(2, case.n // 6)
    base = torch.rand(nb, case.h, case.w, generator=g) > torch.rand(nb, 1, 1, generator=g)
    masks = base[torch.randint(0, nb, (case.n,), generator=g)]
    masks = masks ^ (torch.rand(case.n, case.h, case.w, generator=g) > 0.9)
    if case.identical:
        masks = masks[:1].expand_as(masks).clone()
    if case.empty:
        masks[torch.rand(case.n, generator=g) < 0.3] = False
    labels = torch.randint(0, case.classes, (case.n,), generator=g, dtype=torch.int32)
    if case.classes == case.n:
        labels = torch.randperm(case.n, generator=g).int()
    order = torch.randperm(case.n, generator=g)
    if case.order == "prefix":
        order = order[: max(1, 3 * case.n // 4)]
    area = masks.sum((1, 2)).double() * (1 + 0.1 * torch.rand(case.n, generator=g, dtype=torch.float64)) \
        if case.area else None
    return masks.to(dtype), labels, order, area


def _decay(masks, labels, order, area, kernel, sigma, blocks=None):
    from fastseg.triton_kernels import matrix_nms as tk

    if blocks is None:
        return tk.matrix_nms_decay(masks, labels, order, area, kernel, sigma)
    return tk._launch_matrix_nms_decay(masks, labels, order, area, kernel, sigma, blocks)


def _check_decay(got, masks, labels, order, area, kernel, sigma):
    want = _reference.matrix_nms_decay(masks, labels, order, area, kernel, sigma)
    assert got.dtype == torch.float64 and got.shape == (order.numel(),)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    if _extension.has_ops():  # the CPU kernel: the same float64 operation order, so ulps apart at most
        cpu = torch.ops.fastseg.matrix_nms_decay(masks, labels, order, area, kernel, sigma)
        torch.testing.assert_close(got, cpu, rtol=1e-15, atol=1e-16)
    return want


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decay_matches_reference(case, kernel, blocks):
    masks, labels, order, area = sample(case)
    got = _decay(masks, labels, order, area, kernel, case.sigma, BLOCKS[blocks])
    want = _check_decay(got, masks, labels, order, area, kernel, case.sigma)
    if case.classes == case.n or case.n == 1:
        assert (got == 1).all()
    if case.identical:
        assert got[0] == 1 and (got[1:] < 1).all()
        if kernel == "linear" and not case.area:
            assert (got[1:] == 0).all()  # duplicates of the top mask are fully suppressed
    if case.n >= 7 and case.classes < case.n and not case.empty:
        assert (want < 0.99).any()  # the case does decay something


def test_many_tiles_and_labels():
    """n = 40 over 16-wide tiles (3 x 3 tiles), labels sorted so that some tiles hold no same-label pair."""
    case = Case(40, 6, 9, 7)
    masks, labels, order, area = sample(case)
    labels = torch.arange(40) // 7  # groups of 7 in input order; order permutes them
    for kernel in ("gaussian", "linear"):
        for bs in (dict(SMALL, SPLIT_K=1), FUSED):
            got = _decay(masks, labels, order, area, kernel, 2.0, bs)
            _check_decay(got, masks, labels, order, area, kernel, 2.0)


def test_fused_negative_linear_decays():
    """mask_area below the pixel counts makes IoUs > 1, so linear decays go negative: the large-n path's
    order keys must keep the order of negative floats too (and a 1-element ratio's sign)."""
    masks, labels, order, _ = sample(Case(33, 2, 11, 13))
    area = masks.sum((1, 2)).double() * 0.4
    stored = _decay(masks, labels, order, area, "linear", 2.0, SMALL)
    assert (stored < 0).any()
    got = _decay(masks, labels, order, area, "linear", 2.0, FUSED)
    _check_decay(got, masks, labels, order, area, "linear", 2.0)
    assert torch.equal(got, stored)


def test_empty_inputs():
    masks = torch.zeros(0, 5, 7, dtype=torch.bool)
    empty = torch.zeros(0, dtype=torch.int64)
    out = _decay(masks, empty, empty, None, "gaussian", 2.0)
    assert out.shape == (0,) and out.dtype == torch.float64
    masks, labels, _, _ = sample(CASES[2])
    out = _decay(masks, labels, empty, None, "linear", 2.0)  # n = 0 of n0 = 7
    assert out.shape == (0,) and out.dtype == torch.float64
    for bs in (None, FUSED):  # H*W = 0: empty unions, no decay
        out = _decay(torch.zeros(3, 0, 4, dtype=torch.bool), labels[:3], torch.arange(3), None, "gaussian", 2.0, bs)
        assert torch.equal(out, torch.ones(3, dtype=torch.float64))


def test_strided_and_uint8_masks():
    """Non-contiguous masks (a flattenable view, and one that needs a copy) and uint8 masks counting
    where != 0 (as the CPU kernel) all give the contiguous bool result."""
    case = Case(33, 2, 11, 13)
    masks, labels, order, _ = sample(case)
    want = _decay(masks, labels, order, None, "gaussian", 2.0, SMALL)
    _check_decay(want, masks, labels, order, None, "gaussian", 2.0)
    every_other = torch.zeros(66, 11, 13, dtype=torch.bool)
    every_other[::2] = masks
    wide = torch.zeros(33, 11, 26, dtype=torch.bool)
    wide[..., ::2] = masks
    transposed = masks.transpose(1, 2).contiguous().transpose(1, 2)
    u8 = masks.to(torch.uint8) * torch.randint(1, 256, masks.shape, dtype=torch.uint8)
    for m in (every_other[::2], wide[..., ::2], transposed, u8, u8.transpose(1, 2).contiguous().transpose(1, 2)):
        for bs in BLOCKS.values():
            assert torch.equal(_decay(m, labels, order, None, "gaussian", 2.0, bs), want)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_deterministic(blocks):
    masks, labels, order, area = sample(CASES[8])
    bs = BLOCKS[blocks]
    runs = [_decay(masks, labels, order, area, "gaussian", 0.5, bs) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


NMS_KW = [
    dict(kernel="gaussian", sigma=2.0),
    dict(kernel="linear", sigma=2.0, filter_thr=0.1),
    dict(kernel="gaussian", sigma=0.5, filter_thr=0.05, nms_pre=25, max_num=10),
    dict(kernel="linear", sigma=0.5, nms_pre=30, max_num=20),
]


@pytest.mark.parametrize("area", [False, True])
@pytest.mark.parametrize("kw", NMS_KW, ids=lambda kw: "_".join(f"{k}{v}" for k, v in kw.items()))
def test_matrix_nms_keep_inds(kw, area):
    """The public op with backend="triton" keeps the same masks as the reference, in the same order."""
    masks, labels, _, mask_area = sample(Case(37, 3, 13, 17, area=area))
    scores = (torch.rand(37, generator=torch.Generator().manual_seed(5)) * 20).round() / 20  # ties
    got = ops.matrix_nms(masks, labels, scores, **kw, mask_area=mask_area, backend="triton")
    want = ops.matrix_nms(masks, labels, scores, **kw, mask_area=mask_area, backend="reference")
    assert torch.equal(got[3], want[3]), "keep_inds differ"
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_matrix_nms_batched_one_call():
    """The single-launch batch path (used on GPUs): masks concatenated, labels unique per image."""
    samples = [sample(Case(n, c, 9, 11)) for n, c in ((20, 2), (0, 1), (13, 1))]
    masks, labels = [s[0] for s in samples], [s[1] for s in samples]
    scores = [torch.rand(len(m), generator=torch.Generator().manual_seed(len(m))) for m in masks]
    args = (masks, masks, labels, scores, None, "gaussian", 2.0, 0.05, 15, 10)
    got = nms._batched_one_call(*args, "triton")
    want = nms._batched_one_call(*args, "reference")
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g[3], w[3])
        torch.testing.assert_close(g[0], w[0], rtol=1e-6, atol=1e-7)


def test_rejects_bad_arguments():
    from fastseg.triton_kernels import matrix_nms as tk

    m = torch.zeros(3, 4, 5, dtype=torch.bool)
    lab, order = torch.zeros(3, dtype=torch.long), torch.arange(3)
    bad = [
        ((m[0], lab, order, None, "gaussian", 2.0), "masks"),
        ((m.float(), lab, order, None, "gaussian", 2.0), "masks"),
        ((m, lab[:2], order, None, "gaussian", 2.0), "labels"),
        ((m, lab.float(), order, None, "gaussian", 2.0), "labels"),
        ((m, lab, order.int(), None, "gaussian", 2.0), "order"),
        ((m, lab, torch.arange(4), None, "gaussian", 2.0), "order"),
        ((m, lab, torch.tensor([0, 3]), None, "gaussian", 2.0), "order"),
        ((m, lab, order, torch.ones(2), "gaussian", 2.0), "mask_area"),
        ((m, lab, order, torch.ones(3, dtype=torch.long), "gaussian", 2.0), "mask_area"),
        ((m, lab, order, None, "box", 2.0), "kernel"),
        ((m, lab, order, None, "gaussian", 0.0), "sigma"),
        ((m, lab, order, None, "linear", float("nan")), "sigma"),
    ]
    for args, name in bad:
        with pytest.raises((ValueError, RuntimeError), match=name):
            tk.matrix_nms_decay(*args)
