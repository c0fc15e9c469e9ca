"""Triton backends of fastseg.ops.dynamic_mask_head and matrix_nms_packed under TRITON_INTERPRET=1 (CPU
tensors, float32): the float64 check of tests/test_dynamic_mask_head.py (decisions may differ only near
the threshold, areas are the popcounts, maskness the float64 mean over the returned mask) on odd sizes,
n = 0 and 1, strict ties; the float32 logit threshold; matrix_nms_packed == matrix_nms keep_inds.

Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_dynamic_mask_head_triton.py -m interpret``
(the interpreter must be on before triton is first imported).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_dynamic_mask_head import check_against_float64, nms_sample, sample_inputs

from fastseg import ops
from fastseg.ops import _reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]

# Tiny shapes: n spanning one and two row blocks, H·W below, at and above one 128-pixel program.
SHAPES = [(0, 8, 5, 7), (1, 3, 1, 1), (13, 17, 9, 11), (37, 40, 8, 16), (5, 33, 13, 19)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64(shape):
    kernels, features = sample_inputs(*shape)
    for thr in (0.5, 0.3):
        out = ops.dynamic_mask_head(kernels, features, mask_thr=thr, backend="triton")
        check_against_float64(out, kernels, features, thr)


def test_threshold_is_strict():
    kernels, features = sample_inputs(5, 9, 7, 11, seed="ties")
    kernels[1] = 0
    features[:, 2, :] = 0
    out = ops.dynamic_mask_head(kernels, features, mask_thr=0.5, backend="triton")
    got = ops.unpack_masks(out.masks, 7, 11)
    assert not got[1].any() and out.areas[1] == 0 and out.maskness[1] == 0 and not got[:, 2, :].any()
    below = ops.dynamic_mask_head(kernels, features, mask_thr=0.49, backend="triton")
    assert ops.unpack_masks(below.masks, 7, 11)[1].all()


def test_logit_threshold_f32():
    from fastseg.triton_kernels.dynamic_mask_head import logit_threshold_f32

    assert logit_threshold_f32(0.5) == 0.0
    assert logit_threshold_f32(0.0) == -math.inf and logit_threshold_f32(1.0) == math.inf
    for thr in (0.1, 0.3, 0.49, 0.7, 0.999):
        lt = math.log(thr) - math.log1p(-thr)
        t = logit_threshold_f32(thr)
        up = torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(math.inf)).item()
        assert t <= lt < up  # the float32 just below (or at) the exact logit


def test_rejects_float64():
    kernels, features = sample_inputs(3, 4, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        ops.dynamic_mask_head(kernels, features, backend="triton")


@pytest.mark.parametrize("n,classes,h,w,kw", [
    (1, 1, 3, 3, {}),
    (17, 1, 9, 11, dict(kernel="linear")),
    (40, 3, 8, 8, dict(filter_thr=0.1, max_num=10)),
])
def test_matrix_nms_packed_equals_unpacked(n, classes, h, w, kw):
    masks, labels, scores = nms_sample(n, classes, h, w, str(kw))
    area = masks.sum((1, 2)).float()
    packed = _reference.pack_bits(masks.flatten(1))
    got = ops.matrix_nms_packed(packed, h * w, labels, scores, mask_area=area, backend="triton", **kw)
    want = ops.matrix_nms(masks, labels, scores, mask_area=area, backend="reference", **kw)
    assert torch.equal(got[2], want[3]) and torch.equal(got[0], want[0])
