"""fastseg.ops.roi_align and roi_upsample against torchvision and float64 oracles."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch
import torchvision
from conftest import TOL, assert_matches_reference, check_forward_backward

from fastseg import ops
from fastseg.ops import _reference

BACKENDS = ["reference", "cpu"]


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    h: int
    w: int
    k: int
    out: tuple[int, int] = (7, 7)
    scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = False

    def __str__(self) -> str:
        return (f"n{self.n}c{self.c}_{self.h}x{self.w}_k{self.k}_o{self.out[0]}x{self.out[1]}_s{self.scale:g}"
                f"_sr{self.sampling_ratio}{'_aligned' if self.aligned else ''}")


CASES = [
    Case(2, 3, 13, 17, 23),
    Case(1, 5, 11, 7, 9, out=(5, 3), scale=0.5, sampling_ratio=2, aligned=True),
    Case(3, 2, 19, 23, 31, out=(4, 6), scale=0.25, sampling_ratio=1),
    Case(2, 7, 9, 9, 17, out=(14, 14), scale=0.125, aligned=True),
    Case(1, 1, 1, 1, 3, out=(2, 2)),  # a 1x1 map
    Case(1, 2, 40, 37, 9, out=(3, 4), scale=1.5),  # adaptive grids of 10+ samples per bin
    Case(2, 3, 13, 17, 0),  # no RoIs
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, device="cpu", dtype=torch.float64):
    """features and RoIs: inside, partly outside, tiny and larger than the image (image coordinates)."""
    torch.manual_seed(zlib.crc32(str(case).encode()))
    feats = torch.randn(case.n, case.c, case.h, case.w, dtype=torch.float64)
    img_w, img_h = case.w / case.scale, case.h / case.scale
    xy = torch.rand(case.k, 2, dtype=torch.float64) * torch.tensor([img_w * 1.2, img_h * 1.2]) - 0.1 * img_w
    wh = torch.rand(case.k, 2, dtype=torch.float64) * torch.tensor([img_w, img_h])
    if case.k > 3:
        wh[:2] *= 0.02  # tiny
        wh[2] *= 3.0  # larger than the image
    idx = torch.randint(0, case.n, (case.k, 1)).double()
    rois = torch.cat([idx, xy, xy + wh], dim=1)
    return feats.to(device=device, dtype=dtype), rois.to(device=device, dtype=dtype)


def _kw(case: Case):
    return {"spatial_scale": case.scale, "sampling_ratio": case.sampling_ratio, "aligned": case.aligned}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_align_matches_torchvision(backend, case, dtype):
    feats, rois = sample_inputs(case, dtype=dtype)
    feats.requires_grad_(True)
    out = ops.roi_align(feats, rois, case.out, **_kw(case), backend=backend)
    f64 = feats.detach().double().requires_grad_(True)
    want = torchvision.ops.roi_align(f64, rois.double(), case.out, **_kw(case))
    assert_matches_reference(out, want, torchvision.ops.roi_align(feats, rois, case.out, **_kw(case)))
    if case.k == 0:
        return
    grad = torch.randn_like(want)
    (g,) = torch.autograd.grad(out, feats, grad.to(dtype))
    (gw,) = torch.autograd.grad(want, f64, grad)
    assert_matches_reference(g, gw, name="grad features")


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_upsample_adjoint_is_roi_align_backward(backend, case):
    feats, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out, dtype=torch.float64)
    f = feats.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(torchvision.ops.roi_align(f, rois, case.out, **_kw(case)), f, maps)
    got = ops.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, mode="adjoint", **_kw(case),
                           backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def _aunet_loop(maps, rois, n, h, w, scale, sampling_ratio, aligned):
    """AUNet's RoIUpsample by its definition, one sample at a time (float64, slow): each sample of
    RoIAlign's grid adds value * w_k / sum(w²) to its four bilinear neighbours; no /count."""
    out = torch.zeros(n, maps.shape[1], h, w, dtype=torch.float64)
    ph, pw = maps.shape[2:]
    off = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        x1, y1, x2, y2 = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        gh = sampling_ratio if sampling_ratio > 0 else int(torch.tensor(rh / ph).ceil())
        gw = sampling_ratio if sampling_ratio > 0 else int(torch.tensor(rw / pw).ceil())
        for i in range(ph):
            for j in range(pw):
                for iy in range(gh):
                    for ix in range(gw):
                        y = y1 + i * rh / ph + (iy + 0.5) * rh / ph / gh
                        x = x1 + j * rw / pw + (ix + 0.5) * rw / pw / gw
                        if y < -1 or y > h or x < -1 or x > w:
                            continue
                        y, x = max(y, 0.0), max(x, 0.0)
                        yl, xl = int(y), int(x)
                        yh, xh = min(yl + 1, h - 1), min(xl + 1, w - 1)
                        if yl >= h - 1:
                            yl = yh = h - 1
                            y = float(yl)
                        if xl >= w - 1:
                            xl = xh = w - 1
                            x = float(xl)
                        ly, lx = y - yl, x - xl
                        hy, hx = 1 - ly, 1 - lx
                        norm = (hy * hy + ly * ly) * (hx * hx + lx * lx)
                        v = maps[k, :, i, j] / norm
                        for yy, xx, wt in ((yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)):
                            out[int(b), :, yy, xx] += v * wt
    return out


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=[str(c) for c in CASES[:3] + CASES[4:]])
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_upsample_aunet_matches_its_definition(backend, case):
    _, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out, dtype=torch.float64)
    got = ops.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, mode="aunet", **_kw(case),
                           backend=backend)
    want = _aunet_loop(maps, rois, case.n, case.h, case.w, case.scale, case.sampling_ratio, case.aligned)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mode", ["adjoint", "aunet"])
@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_upsample_backward_is_its_adjoint(backend, case, mode):
    """<up(y), x> = <y, up^T(x)>, with up^T taken from autograd of the op under test."""
    _, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out, dtype=torch.float64, requires_grad=True)
    x = torch.randn(case.n, case.c, case.h, case.w, dtype=torch.float64)
    up = ops.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, mode=mode, **_kw(case), backend=backend)
    (up_t,) = torch.autograd.grad(up, maps, x)
    torch.testing.assert_close((up.detach() * x).sum(), (maps.detach() * up_t).sum(), atol=1e-9, rtol=1e-10)
    if mode == "adjoint":  # its adjoint is roi_align itself
        torch.testing.assert_close(up_t, torchvision.ops.roi_align(x, rois, case.out, **_kw(case)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    case = Case(2, 2, 5, 6, 4, out=(3, 2), scale=0.5, sampling_ratio=2)
    feats, rois = sample_inputs(case)
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: ops.roi_align(f, rois, case.out, **_kw(case), backend=backend),
                                    (feats,))
    maps = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    for mode in ("adjoint", "aunet"):
        assert torch.autograd.gradcheck(
            lambda m, mode=mode: ops.roi_upsample(m, rois, (5, 6), batch_size=2, mode=mode, **_kw(case),
                                                  backend=backend), (maps,))


def test_list_of_boxes_and_default_batch_size():
    feats = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 5.0]], dtype=torch.float64),
             torch.tensor([[0.0, 2.0, 10.0, 8.0], [3.0, 3.0, 4.0, 4.0]], dtype=torch.float64)]
    out = ops.roi_align(feats, boxes, 3)
    torch.testing.assert_close(out, torchvision.ops.roi_align(feats, boxes, 3))
    up = ops.roi_upsample(out, boxes, (9, 11))
    assert up.shape == (2, 3, 9, 11)
    empty = ops.roi_upsample(torch.zeros(0, 3, 3, 3), torch.zeros(0, 5), (9, 11))
    assert empty.shape == (0, 3, 9, 11)


BAD = [
    ("rois not [K, 5]", lambda f: ops.roi_align(f, torch.zeros(3, 4), 2), "rois must be"),
    ("batch index out of range", lambda f: ops.roi_align(f, torch.tensor([[2.0, 0, 0, 1, 1]]), 2), "batch indices"),
    ("negative output size", lambda f: ops.roi_align(f, torch.tensor([[0.0, 0, 0, 1, 1]]), -2), "output_size"),
    ("unknown mode", lambda f: ops.roi_upsample(torch.zeros(1, 3, 2, 2), torch.tensor([[0.0, 0, 0, 1, 1]]), (5, 5),
                                                mode="bilinear"), "mode must be"),
    ("maps/rois count", lambda f: ops.roi_upsample(torch.zeros(2, 3, 2, 2), torch.tensor([[0.0, 0, 0, 1, 1]]),
                                                   (5, 5)), "roi_maps has 2 maps"),
    ("non-finite rois", lambda f: ops.roi_align(f, torch.tensor([[0.0, 0, 0, float("nan"), 1]]), 2), "finite"),
    ("features rank", lambda f: ops.roi_align(f[0], torch.tensor([[0.0, 0, 0, 1, 1]]), 2), "features must be"),
    ("empty feature map", lambda f: ops.roi_align(f[:, :, :0], torch.tensor([[0.0, 0, 0, 1, 1]]), 2), "H, W > 0"),
]


@pytest.mark.parametrize("name,call,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(2, 3, 5, 5))


def test_reference_upsample_in_chunks(monkeypatch):
    """The reference upsamples a few RoIs at a time (memory): one RoI per chunk gives the same sum."""
    case = CASES[0]
    _, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out, dtype=torch.float64)
    whole = _reference.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n)
    monkeypatch.setattr(_reference, "_CHUNK_ELEMENTS", 1)
    torch.testing.assert_close(_reference.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n), whole)


def test_reference_align_in_chunks(monkeypatch):
    """The reference pools per image and a few RoIs at a time (a detector's RoIs on a stride-4 map):
    one RoI per chunk gives the same values and gradient, in the RoIs' order."""
    case = CASES[2]
    feats, rois = sample_inputs(case)
    f1, f2 = feats.clone().requires_grad_(True), feats.clone().requires_grad_(True)
    whole = _reference.roi_align(f1, rois, case.out, **_kw(case))
    monkeypatch.setattr(_reference, "_CHUNK_ELEMENTS", 1)
    chunked = _reference.roi_align(f2, rois, case.out, **_kw(case))
    torch.testing.assert_close(chunked, whole)
    grad = torch.randn_like(whole)
    torch.testing.assert_close(torch.autograd.grad(chunked, f2, grad)[0], torch.autograd.grad(whole, f1, grad)[0])


def test_reference_is_exactly_torchvision_in_float64():
    feats, rois = sample_inputs(CASES[0])
    torch.testing.assert_close(_reference.roi_align(feats, rois, 7), torchvision.ops.roi_align(feats, rois, 7),
                               atol=1e-12, rtol=0)


COMPILED = [b for b in BACKENDS if b != "reference"]


def _sample_grad(case: Case):
    feats, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out, dtype=torch.float64)
    return feats, rois, maps


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend, layout):
    case = CASES[0]
    feats, rois, maps = _sample_grad(case)
    if layout == "channels_last":
        f, m = feats.contiguous(memory_format=torch.channels_last), maps.contiguous(memory_format=torch.channels_last)
    else:
        f, m = feats.repeat_interleave(2, dim=3)[..., ::2], maps.repeat_interleave(2, dim=2)[:, :, ::2]
        rois = rois.repeat_interleave(2, dim=1)[:, ::2]
        assert not (f.is_contiguous() or m.is_contiguous() or rois.is_contiguous())
    torch.testing.assert_close(ops.roi_align(f, rois, case.out, **_kw(case), backend=backend),
                               torchvision.ops.roi_align(feats, rois, case.out, **_kw(case)))
    for mode in ("adjoint", "aunet"):
        torch.testing.assert_close(
            ops.roi_upsample(m, rois, (case.h, case.w), batch_size=case.n, mode=mode, **_kw(case), backend=backend),
            _reference.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, mode=mode, **_kw(case)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_channels_and_images(backend):
    feats = torch.randn(2, 0, 5, 6)
    rois = torch.tensor([[1.0, 0, 0, 3, 3]])
    assert ops.roi_align(feats, rois, 2, backend=backend).shape == (1, 0, 2, 2)
    up = ops.roi_upsample(torch.randn(1, 3, 2, 2), rois, (5, 6), batch_size=3, backend=backend)
    assert up.shape == (3, 3, 5, 6) and up[0].abs().sum() == 0 and up[2].abs().sum() == 0 and up[1].abs().sum() > 0


@pytest.mark.parametrize("backend", COMPILED)
def test_deterministic(backend):
    """The CPU scatter visits each image's RoIs in index order: repeated runs are bit-identical."""
    case = CASES[0]
    _, rois, maps = _sample_grad(case)
    maps, rois = maps.float(), rois.float()
    runs = [ops.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, backend=backend) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend):
    case = CASES[1]
    feats, rois, maps = _sample_grad(case)
    args = (case.scale, case.sampling_ratio, case.aligned)
    torch.library.opcheck(torch.ops.fastseg.roi_align, (feats.requires_grad_(), rois, *case.out, *args))
    for mode in ("adjoint", "aunet"):
        torch.library.opcheck(torch.ops.fastseg.roi_upsample,
                              (maps.requires_grad_(), rois, case.n, case.h, case.w, *args, mode))
        torch.library.opcheck(torch.ops.fastseg._roi_upsample_backward, (feats.detach(), rois, *case.out, *args, mode))
    torch.library.opcheck(torch.ops.fastseg._roi_align_backward,
                          (maps.detach(), rois, case.n, case.h, case.w, *args))


@pytest.mark.parametrize("backend", COMPILED)
def test_compile_fullgraph(backend):
    case = CASES[0]
    feats, rois, maps = _sample_grad(case)

    def fn(f, m):
        a = ops.roi_align(f, rois, case.out, **_kw(case), backend=backend)
        return a, ops.roi_upsample(m, rois, (case.h, case.w), batch_size=case.n, **_kw(case), backend=backend)

    want = fn(feats, maps)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(feats, maps)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def _align(x=None, rois=None, ph=2):
    x = torch.randn(1, 2, 4, 4) if x is None else x
    return torch.ops.fastseg.roi_align(x, torch.zeros(1, 5) if rois is None else rois, ph, 2, 1.0, -1, False)


def _upsample(rois=None, mode="aunet"):
    rois = torch.zeros(1, 5) if rois is None else rois
    return torch.ops.fastseg.roi_upsample(torch.randn(1, 2, 2, 2), rois, 1, 4, 4, 1.0, -1, False, mode)


DIRECT_BAD = [
    ("rois shape", lambda: _align(rois=torch.zeros(2, 4)), "rois must be"),
    ("batch index", lambda: _align(rois=torch.tensor([[3.0, 0, 0, 2, 2]])), "batch index"),
    ("pooled size", lambda: _align(ph=0), "pooled_h"),
    ("empty feature map", lambda: _align(torch.randn(1, 3, 4, 0)), "H, W > 0"),
    ("mode", lambda: _upsample(mode="nearest"), "mode"),
    ("nan rois", lambda: _upsample(rois=torch.full((1, 5), float("nan"))), "finite"),
    ("dtype", lambda: _align(torch.randn(1, 2, 4, 4).to(torch.complex64)), "floating point"),
    ("rois dtype", lambda: _align(rois=torch.zeros(1, 5, dtype=torch.int64)), "rois must be floating"),
]


@pytest.mark.skipif("cpu" not in COMPILED, reason="the compiled extension is not built")
@pytest.mark.parametrize("name,call,match", DIRECT_BAD, ids=[b[0] for b in DIRECT_BAD])
def test_bad_input_direct(name, call, match):
    """Callers of torch.ops.fastseg.* skip the Python checks: the C++ ones must catch these."""
    with pytest.raises(RuntimeError, match=match):
        call()


# ---- GPU: the cuda and triton backends (skipped with a reason when no GPU is present) ----

GPU_BACKENDS = ["cuda", "triton"]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_reference(backend, case, dtype):
    feats, rois = sample_inputs(case, "cuda", dtype)
    maps = torch.randn(case.k, case.c, *case.out, device="cuda", dtype=dtype)
    size, kw = (case.h, case.w), _kw(case)
    check_forward_backward(lambda f: ops.roi_align(f, rois, case.out, **kw, backend=backend),
                           lambda f: torchvision.ops.roi_align(f, rois.to(f.dtype), case.out, **kw),
                           [feats], ["features"])
    for mode in ("adjoint", "aunet"):
        check_forward_backward(
            lambda m, mode=mode: ops.roi_upsample(m, rois, size, batch_size=case.n, mode=mode, **kw, backend=backend),
            lambda m, mode=mode: _reference.roi_upsample(m, rois.to(m.dtype), size, batch_size=case.n, mode=mode,
                                                         **kw), [maps], ["roi_maps"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic_mode(backend, dtype):
    """Under torch.use_deterministic_algorithms the scatter (roi_upsample, roi_align's backward) is a
    gather over output pixels: repeated runs are bit-identical and agree with the default path."""
    case = Case(2, 19, 37, 41, 300, out=(7, 7), scale=0.5, aligned=True)  # many overlapping RoIs
    feats, rois = sample_inputs(case, "cuda", dtype)
    maps = torch.randn(case.k, case.c, *case.out, device="cuda", dtype=dtype)
    f = feats.requires_grad_(True)

    def scatters():
        up = ops.roi_upsample(maps, rois, (case.h, case.w), batch_size=case.n, **_kw(case), backend=backend)
        (g,) = torch.autograd.grad(ops.roi_align(f, rois, case.out, **_kw(case), backend=backend), f, maps)
        return up, g

    default = scatters()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [scatters() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(False)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))
    atol, rtol = {torch.float32: (1e-5, 1e-5)}.get(dtype, (2e-2, 2e-2))
    for a, b in zip(runs[0], default, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_opcheck():
    case = CASES[1]
    feats, rois = sample_inputs(case, "cuda", torch.float32)
    maps = torch.randn(case.k, case.c, *case.out, device="cuda")
    args = (case.scale, case.sampling_ratio, case.aligned)
    torch.library.opcheck(torch.ops.fastseg.roi_align, (feats.requires_grad_(), rois, *case.out, *args))
    for mode in ("adjoint", "aunet"):
        torch.library.opcheck(torch.ops.fastseg.roi_upsample,
                              (maps.requires_grad_(), rois, case.n, case.h, case.w, *args, mode))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_compile_fullgraph(backend):
    case = CASES[0]
    feats, rois = sample_inputs(case, "cuda", torch.float32)
    maps = torch.randn(case.k, case.c, *case.out, device="cuda")

    def fn(f, m):
        a = ops.roi_align(f, rois, case.out, **_kw(case), backend=backend)
        return a, ops.roi_upsample(m, rois, (case.h, case.w), batch_size=case.n, **_kw(case), backend=backend)

    torch._dynamo.reset()
    for g, w in zip(torch.compile(fn, fullgraph=True)(feats, maps), fn(feats, maps), strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (inputs on cuda:1 while cuda:0 is current)")
def test_gpu_triton_on_a_device_that_is_not_current():
    """Triton launches on the current device and stream: the ops must switch to their inputs' device."""
    case = CASES[0]
    feats, rois = sample_inputs(case, "cuda:1", torch.float32)
    feats.requires_grad_(True)
    maps = torch.randn(case.k, case.c, *case.out, device="cuda:1", requires_grad=True)
    size, kw = (case.h, case.w), _kw(case)
    with torch.cuda.device(0):
        check_forward_backward(lambda f: ops.roi_align(f, rois, case.out, **kw, backend="triton"),
                               lambda f: _reference.roi_align(f, rois.to(f.dtype), case.out, **kw),
                               [feats], ["features"])
        for mode in ("adjoint", "aunet"):
            check_forward_backward(
                lambda m, mode=mode: ops.roi_upsample(m, rois, size, batch_size=case.n, mode=mode, **kw,
                                                      backend="triton"),
                lambda m, mode=mode: _reference.roi_upsample(m, rois.to(m.dtype), size, batch_size=case.n, mode=mode,
                                                             **kw), [maps], ["roi_maps"])
        assert torch.cuda.current_device() == 0


def _integer_boxes(k: int, n: int, size: tuple[int, int], out: tuple[int, int], scale: float, device) -> torch.Tensor:
    """[k, 5] RoIs whose feature-space heights and widths are exact multiples (1 to 8) of the pooled size
    at integer feature coordinates (some partly outside), in image coordinates: bins of whole pixels."""
    g = torch.Generator().manual_seed(int(1 / scale))
    rows = []
    for _ in range(k):
        box, ends = [float(torch.randint(0, n, (1,), generator=g))], []
        for length, pooled in ((size[1], out[1]), (size[0], out[0])):  # x, then y
            extent = pooled * int(torch.randint(1, 9, (1,), generator=g))
            start = int(torch.randint(-2, max(-1, length - extent + 3), (1,), generator=g))
            box.append(start / scale)
            ends.append((start + extent) / scale)
        rows.append(box + ends)
    return torch.tensor(rows, device=device)


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.125])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_integer_boxes_match_torchvision(backend, scale, aligned):
    """Bins of exactly m pixels: ceil(roi / pooled) must be m, not m + 1 (a compiled fp32 `/` is not
    IEEE on the GPU). One sample more per bin moves every sample: errors of order 0.1, not 1e-6."""
    torch.manual_seed(11)
    feats = torch.randn(2, 3, 64, 64, device="cuda")
    rois = _integer_boxes(64, 2, (64, 64), (7, 5), scale, "cuda")
    kw = dict(spatial_scale=scale, sampling_ratio=-1, aligned=aligned)
    f, ft = (feats.clone().requires_grad_(True) for _ in range(2))
    out = ops.roi_align(f, rois, (7, 5), **kw, backend=backend)
    want = torchvision.ops.roi_align(ft, rois, (7, 5), **kw)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(out, f, grad)[0], torch.autograd.grad(want, ft, grad)[0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_float16_large_values_do_not_overflow(backend):
    """fp16 features of magnitude 2e4..3e4 and adaptive grids of 4 to 7 samples per bin: nothing in
    between may exceed fp16's 65504 (the Triton gather rounds X A_x^T to fp16 for its second dot)."""
    from conftest import TOL

    torch.manual_seed(5)
    mag = torch.empty(2, 5, 48, 48, device="cuda").uniform_(2e4, 3e4)
    sign = torch.ones_like(mag)
    sign[:, 1:] = torch.randint(0, 2, (2, 4, 48, 48), device="cuda").float() * 2 - 1  # channel 0: all positive
    feats = (mag * sign).half()
    xy = torch.rand(40, 2, device="cuda") * 10
    wh = 28 + torch.rand(40, 2, device="cuda") * 18  # 7 x 7 bins of 4 to 6.6 pixels
    # fp16 boxes: fastseg.ops rounds the RoIs to the features' dtype, as torchvision requires
    rois = torch.cat([torch.randint(0, 2, (40, 1), device="cuda").float(), xy, xy + wh], dim=1).half()
    for aligned in (False, True):
        out = ops.roi_align(feats, rois, (7, 7), sampling_ratio=-1, aligned=aligned, backend=backend)
        want = torchvision.ops.roi_align(feats.double(), rois.double(), (7, 7), sampling_ratio=-1, aligned=aligned)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), f"aligned={aligned}: inf in the output"
        atol, rtol = TOL[torch.float16]  # the fp16 row, scaled to the data's magnitude
        torch.testing.assert_close(out.double() / 3e4, want / 3e4, atol=atol, rtol=rtol)


@pytest.mark.gpu
def test_gpu_triton_fp32_dot_precision_follows_torch():
    """fp32 dots follow torch.get_float32_matmul_precision(): "highest" (the default) and "high" are fp32
    accurate, "medium" is TF32 (visibly different, within TF32's error)."""
    case = CASES[5]  # adaptive grids of 10+ samples per bin
    feats, rois = sample_inputs(case, "cuda", torch.float32)
    want = torchvision.ops.roi_align(feats.double(), rois.double(), case.out, **_kw(case))
    previous = torch.get_float32_matmul_precision()
    got = {}
    try:
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            got[precision] = ops.roi_align(feats, rois, case.out, **_kw(case), backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    for precision in ("highest", "high"):
        torch.testing.assert_close(got[precision].double(), want, atol=1e-5, rtol=1e-5, msg=precision)
    torch.testing.assert_close(got["medium"].double(), want, atol=1e-2, rtol=1e-2)
    assert not torch.equal(got["medium"], got["highest"]), "medium precision should round the dots' inputs to TF32"


@pytest.mark.gpu
def test_gpu_triton_shapes_share_compiled_kernels():
    """The gather and scatter kernels do not specialise on shape integers (N, C, H, W, pooled sizes):
    shapes that differ only in those (strides kept 16-aligned, which stay specialised; block sizes
    equal) compile each kernel at most once."""
    from fastseg.triton_kernels import roi_align as tk

    kernels = (tk._roi_gather_kernel, tk._roi_scatter_kernel)
    device = torch.cuda.current_device()
    # JITFunction.device_caches[device][0] is the compiled-kernel cache in Triton 3.6 and 3.8 alike.
    before = [set(k.device_caches[device][0]) for k in kernels]
    for n, c, h, ph in ((1, 5, 16, 7), (2, 16, 17, 14), (3, 17, 33, 16), (1, 4, 48, 9)):
        feats = torch.randn(n, c, h, 16, device="cuda", requires_grad=True)
        xy = torch.rand(5, 2, device="cuda") * 8
        wh = 4 + torch.rand(5, 2, device="cuda") * 20
        rois = torch.cat([torch.randint(0, n, (5, 1), device="cuda").float(), xy, xy + wh], dim=1)
        out = ops.roi_align(feats, rois, (ph, 16), spatial_scale=0.5, aligned=True, backend="triton")
        torch.autograd.grad(out, feats, torch.randn_like(out))
    new = [len(set(k.device_caches[device][0]) - b) for k, b in zip(kernels, before, strict=True)]
    assert new[0] <= 1 and new[1] <= 1, f"new compiled variants (gather, scatter): {new}"


# ---- mixed precision: float32 RoIs with float16/bfloat16 data; huge and non-finite boxes ----


def _edge_boxes(k: int = 11, seed: int = 3) -> torch.Tensor:
    """float32 RoIs [k, 5] with edges at x, y ~ 600..1100 px and fractional parts (.3 etc.) that
    float16 (spacing 0.5) and bfloat16 (spacing 4) would move."""
    g = torch.Generator().manual_seed(seed)
    xy = 600 + torch.rand(k, 2, generator=g) * 300
    wh = 20 + torch.rand(k, 2, generator=g) * 200
    idx = torch.randint(0, 2, (k, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], dim=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_rois_with_low_precision_features(backend, dtype):
    """torchvision's autocast policy: geometry in float32 from float32 RoIs, result in the data dtype,
    against torchvision on the float32-upcast features (the boxes are never rounded to the data
    dtype: in bfloat16 an edge at 1000.3 would move to 1000)."""
    torch.manual_seed(0)
    rois = _edge_boxes()
    feats = torch.randn(2, 3, 73, 71).to(dtype)  # a stride-16 map of a 1168 x 1136 image
    kw = {"spatial_scale": 1 / 16, "sampling_ratio": -1, "aligned": True}
    x = feats.clone().requires_grad_(True)
    out = ops.roi_align(x, rois, (7, 7), **kw, backend=backend)
    assert out.dtype == dtype
    want = torchvision.ops.roi_align(feats.double(), rois.double(), (7, 7), **kw)
    # the float32 torchvision result rounded to the data dtype: the error budget of the output rounding
    rounded = torchvision.ops.roi_align(feats.float(), rois, (7, 7), **kw).to(dtype)
    assert_matches_reference(out, want, rounded, name="roi_align out")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    # the same boxes rounded to the data dtype give a visibly different answer (why this matters)
    moved = torchvision.ops.roi_align(feats.double(), rois.to(dtype).double(), (7, 7), **kw)
    assert (moved - want).abs().max() > 10 * atol
    # the gradient (roi_align's backward = scatter) and roi_upsample, same policy
    grad = torch.randn(out.shape).to(dtype)
    (g,) = torch.autograd.grad(out, x, grad)
    f64 = feats.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(torchvision.ops.roi_align(f64, rois.double(), (7, 7), **kw), f64, grad.double())
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g64, atol=2 * atol, rtol=rtol)
    maps = torch.randn(len(rois), 2, 7, 7).to(dtype)
    up = ops.roi_upsample(maps, rois, (73, 71), batch_size=2, mode="aunet", **kw, backend=backend)
    up64 = _reference.roi_upsample(maps.double(), rois.double(), (73, 71), batch_size=2, mode="aunet", **kw)
    assert up.dtype == dtype
    scale = up64.abs().max().item()
    torch.testing.assert_close(up.double() / scale, up64 / scale, atol=atol, rtol=rtol)
    if backend == "cpu":  # the registered op with mixed dtypes: schema, fake kernel, autograd
        args = (feats.clone().requires_grad_(True), rois, 7, 7, 1 / 16, -1, True)
        torch.library.opcheck(torch.ops.fastseg.roi_align, args)
        torch.library.opcheck(torch.ops.fastseg.roi_upsample,
                              (maps.clone().requires_grad_(True), rois, 2, 73, 71, 1 / 16, -1, True, "aunet"))


def _valid_samples(start: float, bin_: float, grid: int, pooled: int, size: int) -> torch.Tensor:
    """Per bin, how many of its `grid` samples fall in [-1, size]: every sample enumerated (float32,
    torchvision's formula), the independent oracle of the bounded kernels."""
    i = torch.arange(grid, dtype=torch.float32)
    out = []
    for p in range(pooled):
        v = torch.tensor(start, dtype=torch.float32) + p * torch.tensor(bin_, dtype=torch.float32) \
            + (i + 0.5) * torch.tensor(bin_, dtype=torch.float32) / grid
        out.append(int(((v >= -1) & (v <= size)).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_boxes(backend):
    """A diverged regressor's boxes: adaptive grids of ~1e5 samples per bin axis only cost the samples
    near the map, and count (the divisor) stays exact. 1e6 px: a constant map gives c x (valid
    samples) / count, counted by enumeration. Boxes of ~1000 px (torchvision still runs) and 1e6 px
    with a fixed sampling_ratio: torchvision's values, forward and backward."""
    feats = torch.full((1, 2, 11, 13), 3.0, dtype=torch.float64)
    box = torch.tensor([[0.0, -4e5, -5e5, 6e5, 5e5]], dtype=torch.float64)
    out = ops.roi_align(feats, box, (7, 7), sampling_ratio=-1, backend=backend)
    bw, bh = 1e6 / 7, 1e6 / 7
    gx = gy = math.ceil(bw)
    vy = _valid_samples(-5e5, bh, gy, 7, 11)
    vx = _valid_samples(-4e5, bw, gx, 7, 13)
    want = 3.0 * vy[:, None] * vx[None, :] / (gy * gx)
    assert want.max() > 0
    torch.testing.assert_close(out[0, 0], want, rtol=1e-6, atol=1e-12)

    torch.manual_seed(1)
    feats = torch.randn(2, 2, 11, 13, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, -400.0, -300.0, 700.0, 600.0], [1, -900.3, 2.0, 5.0, 800.0],
                         [1, 3.0, 4.0, 1200.0, 9.0]], dtype=torch.float64)
    for sr, r in ((-1, rois), (2, rois * torch.tensor([1, 1e3, 1e3, 1e3, 1e3], dtype=torch.float64))):
        for aligned in (False, True):
            kw = {"sampling_ratio": sr, "aligned": aligned}
            out = ops.roi_align(feats, r, (5, 4), **kw, backend=backend)
            want = torchvision.ops.roi_align(feats, r, (5, 4), **kw)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)
            grad = torch.randn_like(want)
            (g_want,) = torch.autograd.grad(want, feats, grad)
            torch.testing.assert_close(torch.autograd.grad(out, feats, grad)[0], g_want, rtol=1e-9, atol=1e-12)
            up = ops.roi_upsample(grad, r, (11, 13), batch_size=2, mode="adjoint", **kw, backend=backend)
            torch.testing.assert_close(up, g_want, rtol=1e-9, atol=1e-12)


NON_FINITE = [[0, float("inf"), 0, 5, 5], [0, 0, 0, float("inf"), 5], [0, float("nan"), 1, 4, 4],
              [0, -float("inf"), 0, float("inf"), 5], [float("nan"), 1, 1, 4, 4], [0, -3e38, -3e38, 3e38, 3e38]]


def test_non_finite_boxes():
    """The public API rejects non-finite RoIs; so does the C++ CPU op (test_bad_input_direct). What
    reaches a kernel anyway has a defined, bounded result: such a RoI has no samples (roi_align gives
    zeros, as torchvision's kernels do where they do not crash; roi_upsample drops it). The reference
    implements that definition; finite neighbours are unaffected. +-3e38 boxes (finite, but their size
    overflows float32) behave the same way."""
    torch.manual_seed(2)
    feats = torch.randn(1, 2, 11, 13)
    good = torch.tensor([[0, 1.0, 2.0, 9.0, 7.0]])
    rois = torch.cat([good, torch.tensor(NON_FINITE)])
    out = _reference.roi_align(feats, rois, (3, 3), sampling_ratio=-1)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    torch.testing.assert_close(out[:1], torchvision.ops.roi_align(feats, good, (3, 3)))
    up = _reference.roi_upsample(torch.randn(len(rois), 2, 3, 3), rois, (11, 13), batch_size=1)
    assert torch.isfinite(up).all()
    with pytest.raises(ValueError, match="finite"):
        ops.roi_align(feats, rois, 3)
    if "cpu" in COMPILED:  # the 1e38 box is finite: the C++ check lets it through
        out = torch.ops.fastseg.roi_align(feats, rois[[0, -1]], 3, 3, 1.0, -1, False)
        torch.testing.assert_close(out, _reference.roi_align(feats, rois[[0, -1]], 3))
