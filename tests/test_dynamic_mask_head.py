"""fastseg.ops.dynamic_mask_head against a float64 formulation, and matrix_nms_packed against matrix_nms on
the unpacked masks (keep_inds identical), on odd sizes (H·W not a multiple of 64, n = 0, 1, prime)."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import TOL, relayout

from fastseg import ops
from fastseg.ops import _reference

BACKENDS = ["reference", "cpu"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (n, E, H, W): empty, 1 pixel, H·W = 64 exactly, odd and prime sizes, a wide E.
SHAPES = [(0, 8, 5, 7), (1, 3, 1, 1), (13, 17, 9, 11), (31, 64, 8, 8), (7, 5, 13, 19), (37, 256, 25, 38)]


def sample_inputs(n: int, e: int, h: int, w: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  seed: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """kernels [n, E], features [E, H, W] with logits ~ N(0, 1.5²) (masks of every size, many pixels
    near the threshold), fresh per shape."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{n},{e},{h},{w},{seed}".encode()))
    kernels = torch.randn(n, e, generator=g, dtype=torch.float64) * 1.5
    features = torch.randn(e, h, w, generator=g, dtype=torch.float64) / max(e, 1) ** 0.5
    features += 0.3 * torch.randn(e, 1, 1, generator=g, dtype=torch.float64)  # masks that are mostly in or out
    return kernels.to(device, dtype), features.to(device, dtype)


def prob64(kernels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The float64 probabilities [n, H·W] of the (already rounded) inputs."""
    return torch.sigmoid(kernels.double() @ features.double().reshape(features.shape[0], -1))


def check_against_float64(out: ops.DynamicMasks, kernels: torch.Tensor, features: torch.Tensor,
                          mask_thr: float) -> None:
    """Masks may differ from the float64 decision only for pixels whose float64 probability lies within
    the band of mask_thr that the same-dtype PyTorch formulation's own error spans (ratio rule: 2 x its
    error + atol); areas are the popcounts of the returned masks; the maskness is the float64 mean of the
    probability over the returned mask."""
    n, hw = kernels.shape[0], features.shape[1] * features.shape[2]
    dtype = kernels.dtype
    p64 = prob64(kernels, features)
    assert out.masks.dtype == torch.int64 and out.masks.shape == (n, (hw + 63) // 64)
    assert out.areas.dtype == torch.float32 and out.areas.shape == (n,)
    assert out.maskness.dtype == dtype and out.maskness.shape == (n,)
    got = _reference.unpack_bits(out.masks, hw)
    # Padding bits are zero: the packed words of exactly these bits.
    assert torch.equal(_reference.pack_bits(got), out.masks)
    atol, _ = TOL[dtype]
    if dtype == torch.float64:
        band = atol
    else:
        p_same = torch.sigmoid(kernels @ features.reshape(features.shape[0], -1)).double()
        band = 2 * (p_same - p64).abs().max().item() + atol if n else atol
    differ = got != (p64 > mask_thr)
    near = (p64 - mask_thr).abs() <= band
    assert not (differ & ~near).any(), (
        f"{int((differ & ~near).sum())} pixels decided differently from float64 outside the band {band:.3g}")
    assert torch.equal(out.areas, got.sum(1).float())
    want = torch.where(got.any(1), (p64 * got).sum(1) / got.sum(1).clamp(min=1), torch.zeros_like(p64[:, 0]))
    torch.testing.assert_close(out.maskness.double(), want, atol=atol, rtol=TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, shape, dtype):
    kernels, features = sample_inputs(*shape, dtype=dtype)
    for thr in (0.5, 0.3):
        out = ops.dynamic_mask_head(kernels, features, mask_thr=thr, backend=backend)
        check_against_float64(out, kernels, features, thr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strides_and_score(backend):
    kernels, features = sample_inputs(23, 16, 11, 13, seed="rescore")
    score = torch.rand(23)
    strides = torch.tensor([8.0, 8.0, 16.0, 32.0] * 5 + [8.0, 8.0, 1e9])
    out = ops.dynamic_mask_head(kernels, features, strides=strides, score=score, backend=backend)
    assert torch.equal(out.keep, out.areas > strides)
    assert not out.keep[-1] and out.keep.any()
    torch.testing.assert_close(out.scores, score * out.maskness)
    plain = ops.dynamic_mask_head(kernels, features, backend=backend)
    assert plain.keep.all() and torch.equal(plain.scores, plain.maskness)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_threshold_is_strict(backend, dtype):
    """A probability exactly at mask_thr is outside the mask (mmdet's ``mask_preds > mask_thr``): zero
    logits give 0.5 exactly in every dtype."""
    kernels, features = sample_inputs(5, 9, 7, 11, dtype=dtype, seed="ties")
    kernels[1] = 0
    features[:, 2, :] = 0  # a row of zero logits in every mask
    out = ops.dynamic_mask_head(kernels, features, mask_thr=0.5, backend=backend)
    got = ops.unpack_masks(out.masks, 7, 11)
    assert not got[1].any() and out.areas[1] == 0 and out.maskness[1] == 0
    assert not got[:, 2, :].any()
    below = ops.dynamic_mask_head(kernels, features, mask_thr=0.49, backend=backend)
    assert ops.unpack_masks(below.masks, 7, 11)[1].all() and below.areas[1] == 77


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """Transposed kernels and features stored [H, W, E] (channels last) or cut from a wider map."""
    kernels, features = sample_inputs(11, 24, 9, 13, seed="strided")
    want = ops.dynamic_mask_head(kernels, features, backend=backend)
    k_t = kernels.T.contiguous().T
    for f in (features.permute(1, 2, 0).contiguous().permute(2, 0, 1), relayout(features[None], "wide")[0]):
        got = ops.dynamic_mask_head(k_t, f, backend=backend)
        check_against_float64(got, k_t, f, 0.5)
        if backend != "reference":  # the kernels copy to contiguous: bit-identical (BLAS may differ by layout)
            assert torch.equal(got.masks, want.masks) and torch.equal(got.maskness, want.maskness)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_differentiable(backend):
    kernels, features = sample_inputs(4, 6, 5, 5)
    out = ops.dynamic_mask_head(kernels.requires_grad_(), features, score=torch.rand(4, requires_grad=True),
                                backend=backend)
    assert not any(t.requires_grad for t in out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode(backend):
    """Under torch.inference_mode (how a model's eval runs), with the CPU kernel's worker threads."""
    kernels, features = sample_inputs(150, 32, 40, 50, seed="inference")
    want = ops.dynamic_mask_head(kernels, features, backend=backend)
    with torch.inference_mode():
        got = ops.dynamic_mask_head(kernels.clone(), features.clone(), backend=backend)
        nms = ops.matrix_nms_packed(got.masks, 2000, torch.zeros(150, dtype=torch.long), got.scores,
                                    mask_area=got.areas, max_num=10, backend="cpu" if backend == "cpu" else None)
    assert torch.equal(got.masks, want.masks) and len(nms[2]) == 10


def test_bad_input():
    k, f = sample_inputs(3, 4, 5, 6)
    cases = [
        (dict(kernels=k[0]), "kernels"),
        (dict(kernels=k.long()), "kernels"),
        (dict(features=f[0]), "features"),
        (dict(features=f[:3]), "disagree on E"),
        (dict(features=f.double()), "dtype"),
        (dict(mask_thr=float("nan")), "mask_thr"),
        (dict(strides=torch.ones(4)), "strides"),
        (dict(score=torch.ones(3, dtype=torch.long)), "score"),
        (dict(score=torch.ones(2)), "score"),
    ]
    for kw, match in cases:
        args = dict(kernels=k, features=f) | kw
        with pytest.raises(ValueError, match=match):
            ops.dynamic_mask_head(args.pop("kernels"), args.pop("features"), **args)


# ---- matrix_nms_packed ---------------------------------------------------------------------------

NMS_BACKENDS = ["reference", "cpu"]


def nms_sample(n: int, classes: int, h: int, w: int, seed: str):
    """Overlapping masks (a few base shapes with noise, duplicates possible), labels, scores with ties."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{n},{classes},{h},{w},{seed}".encode()))
    base = torch.rand(max(2, n // 5), h, w, generator=g) > torch.rand(max(2, n // 5), 1, 1, generator=g)
    masks = base[torch.randint(0, len(base), (n,), generator=g)] ^ (torch.rand(n, h, w, generator=g) > 0.9)
    labels = torch.randint(0, classes, (n,), generator=g)
    scores = (torch.rand(n, generator=g) * 20).round() / 20
    return masks, labels, scores


@pytest.mark.parametrize("backend", NMS_BACKENDS)
@pytest.mark.parametrize("n,classes,h,w,kw", [
    (0, 1, 5, 7, {}),
    (1, 1, 3, 3, {}),
    (17, 1, 9, 11, dict(kernel="linear")),
    (61, 3, 8, 8, dict(filter_thr=0.1)),
    (151, 7, 23, 29, dict(nms_pre=100, max_num=40, sigma=0.5)),
    (401, 1, 13, 17, dict(filter_thr=0.05, max_num=100)),
])
def test_matrix_nms_packed_equals_unpacked(backend, n, classes, h, w, kw):
    masks, labels, scores = nms_sample(n, classes, h, w, str(kw))
    area = masks.sum((1, 2)).float()
    packed = _reference.pack_bits(masks.flatten(1))
    got = ops.matrix_nms_packed(packed, h * w, labels, scores, mask_area=area, backend=backend, **kw)
    want = ops.matrix_nms(masks, labels, scores, mask_area=area, backend="reference", **kw)
    assert torch.equal(got[2], want[3]), "keep_inds differ"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_matrix_nms_packed_bad_input():
    masks, labels, scores = nms_sample(5, 2, 9, 9, "bad")
    packed = _reference.pack_bits(masks.reshape(5, -1))
    area = masks.sum((1, 2)).float()
    with pytest.raises(ValueError, match="masks"):
        ops.matrix_nms_packed(packed.int(), 81, labels, scores, mask_area=area)
    with pytest.raises(ValueError, match="masks"):
        ops.matrix_nms_packed(packed, 64, labels, scores, mask_area=area)
    with pytest.raises(ValueError, match="num_pixels"):
        ops.matrix_nms_packed(packed, -1, labels, scores, mask_area=area)
    with pytest.raises(ValueError, match="mask_area"):
        ops.matrix_nms_packed(packed, 81, labels, scores, mask_area=None)
    with pytest.raises(ValueError, match="mask_area"):
        ops.matrix_nms_packed(packed, 81, labels, scores, mask_area=area[:3])
    with pytest.raises(ValueError, match="labels"):
        ops.matrix_nms_packed(packed, 81, labels[:4], scores, mask_area=area)


def test_pipeline_matches_mmdet_style():
    """dynamic_mask_head + matrix_nms_packed == mmdet's float formulation (sigmoid, threshold, sums,
    maskness, Matrix NMS on the binary masks) on the same candidates."""
    kernels, features = sample_inputs(97, 32, 17, 23, dtype=torch.float64, seed="pipeline")
    labels = torch.randint(0, 3, (97,), generator=torch.Generator().manual_seed(3))
    cate = torch.rand(97, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    strides = torch.full((97,), 8.0, dtype=torch.float64)
    out = ops.dynamic_mask_head(kernels, features, strides=strides, score=cate)
    k = out.keep
    got = ops.matrix_nms_packed(out.masks[k], 17 * 23, labels[k], out.scores[k], mask_area=out.areas[k],
                                filter_thr=0.05, max_num=20)
    prob = prob64(kernels, features).view(97, 17, 23)
    binary = prob > 0.5
    area = binary.sum((1, 2)).double()
    keep = area > strides
    maskness = (prob * binary).sum((1, 2)) / area
    want = _reference.matrix_nms(binary[keep], labels[keep], (cate * maskness)[keep], mask_area=area[keep],
                                 filter_thr=0.05, max_num=20)
    assert torch.equal(got[2], want[3])
    torch.testing.assert_close(got[0], want[0])


# ---- opcheck, torch.compile ----------------------------------------------------------------------


def test_opcheck_cpu():
    for shape in ((0, 8, 5, 7), (13, 17, 9, 11)):
        kernels, features = sample_inputs(*shape)
        torch.library.opcheck(torch.ops.fastseg.dynamic_mask_head.default, (kernels, features, 0.5))
    masks, labels, scores = nms_sample(23, 2, 9, 11, "opcheck")
    packed = _reference.pack_bits(masks.flatten(1))
    order = torch.sort(scores, descending=True, stable=True).indices
    torch.library.opcheck(torch.ops.fastseg.matrix_nms_packed_decay.default,
                          (packed, labels, order, masks.sum((1, 2)).float(), "gaussian", 2.0))


def test_compile_fullgraph():
    """dynamic_mask_head compiles without graph breaks (matrix_nms_packed, like matrix_nms, has
    data-dependent output sizes: no fullgraph there)."""
    kernels, features = sample_inputs(19, 16, 9, 11, seed="compile")
    strides = torch.full((19,), 8.0)
    score = torch.rand(19)

    def head(k, f, s, st):
        return ops.dynamic_mask_head(k, f, strides=st, score=s, backend="cpu")

    torch._dynamo.reset()
    got = torch.compile(head, fullgraph=True)(kernels, features, score, strides)
    want = head(kernels, features, score, strides)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ---- GPU ------------------------------------------------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]
# (backend, dtype) pairs each GPU backend supports: Triton has no float64 path.
GPU_CASES = [(b, d) for b in GPU_BACKENDS for d in DTYPES if not (b == "triton" and d == torch.float64)]


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "dtype"), GPU_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SHAPES + [(97, 256, 100, 152)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_float64(backend, shape, dtype):
    kernels, features = sample_inputs(*shape, dtype=dtype, device="cuda")
    out = ops.dynamic_mask_head(kernels, features, backend=backend)
    check_against_float64(ops.DynamicMasks(*(t.cpu() for t in out)), kernels.cpu(), features.cpu(), 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_threshold_is_strict(backend):
    kernels, features = sample_inputs(5, 9, 7, 11, seed="ties", device="cuda")
    kernels[1] = 0
    features[:, 2, :] = 0
    out = ops.dynamic_mask_head(kernels, features, backend=backend)
    got = ops.unpack_masks(out.masks, 7, 11)
    assert not got[1].any() and not got[:, 2, :].any() and out.areas[1] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("n,classes,h,w", [(1, 1, 3, 3), (61, 3, 8, 8), (500, 80, 200, 304), (4100, 2, 9, 13)])
def test_gpu_matrix_nms_packed_equals_unpacked(backend, n, classes, h, w):
    masks, labels, scores = nms_sample(n, classes, h, w, "gpu")
    area = masks.sum((1, 2)).float()
    packed = _reference.pack_bits(masks.flatten(1))
    kw = dict(filter_thr=0.05, max_num=100)
    got = ops.matrix_nms_packed(packed.cuda(), h * w, labels.cuda(), scores.cuda(), mask_area=area.cuda(),
                                backend=backend, **kw)
    want = ops.matrix_nms(masks, labels, scores, mask_area=area, backend="cpu", **kw)
    assert torch.equal(got[2].cpu(), want[3])


@pytest.mark.gpu
def test_gpu_opcheck_compile():
    kernels, features = sample_inputs(37, 64, 25, 38, device="cuda")
    torch.library.opcheck(torch.ops.fastseg.dynamic_mask_head.default, (kernels, features, 0.5))
    torch.library.opcheck(torch.ops.fastseg.dynamic_mask_head_triton.default, (kernels, features, 0.5))
    for backend in GPU_BACKENDS:
        torch._dynamo.reset()
        fn = torch.compile(lambda k, f, b=backend: ops.dynamic_mask_head(k, f, backend=b), fullgraph=True)
        assert torch.equal(fn(kernels, features).masks, ops.dynamic_mask_head(kernels, features, backend=backend).masks)
