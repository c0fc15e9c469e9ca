"""Triton backend of roi_align / roi_upsample under TRITON_INTERPRET=1 (CPU tensors, fp32), against the
float64 reference (and torchvision.ops.roi_align): forward and input gradients of both ops and both
modes, the adjoint identity, small blocks (several tiles, bands and channel programs), strided inputs,
empty inputs, RoIs of no image, double backward, determinism and dtype errors.

The public functions of ``fastseg.triton_kernels.roi_align`` are called directly (not through
fastseg.ops). Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_roi_align_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torchvision
from conftest import TOL, assert_matches_reference

from fastseg.ops import _reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]

MODES = ("adjoint", "aunet")


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
    small_blocks: bool = False  # 16-wide tiles, one channel per program: many programs and loop trips

    def __str__(self) -> str:
        return (f"n{self.n}c{self.c}_{self.h}x{self.w}_k{self.k}_o{self.out[0]}x{self.out[1]}_s{self.scale:g}"
                f"_sr{self.sampling_ratio}{'_aligned' if self.aligned else ''}{'_small' if self.small_blocks else ''}")


# Odd sizes on purpose; 14x14 and 28x28 pad to 16 and 32; the small-block cases span several gather
# bands / column tiles, scatter tiles and channel programs.
CASES = [
    Case(2, 3, 13, 17, 9),
    Case(1, 4, 11, 7, 7, out=(5, 3), scale=0.5, sampling_ratio=2, aligned=True),
    Case(3, 2, 19, 23, 12, out=(4, 6), scale=0.25, sampling_ratio=1),
    Case(2, 3, 9, 9, 8, out=(14, 14), scale=0.5, aligned=True),
    Case(1, 2, 17, 15, 5, out=(28, 28), sampling_ratio=2),
    Case(1, 1, 1, 1, 3, out=(2, 2)),  # a 1x1 map
    Case(2, 3, 24, 21, 10, scale=1.0, sampling_ratio=2, aligned=True, small_blocks=True),
    Case(3, 3, 22, 19, 11, out=(5, 3), scale=0.5, small_blocks=True),
]
IDS = [str(c) for c in CASES]

SMALL_BLOCKS = dict(BLOCK_Y=16, BLOCK_X=16, GATHER_C=1, TILE_H=16, TILE_W=16, SCATTER_C=1)


def sample_inputs(case: Case):
    """fp32 features [N, C, H, W] and RoIs [K, 5] of several images in mixed order: inside, partly
    outside, tiny, larger than the image and (aligned) one inverted box. Float64 copies of the same
    values feed the reference."""
    torch.manual_seed(zlib.crc32(str(case).encode()))
    feats = torch.randn(case.n, case.c, case.h, case.w)
    img_w, img_h = case.w / case.scale, case.h / case.scale
    xy = torch.rand(case.k, 2, dtype=torch.float64) * torch.tensor([img_w * 1.2, img_h * 1.2]) - 0.1 * img_w
    wh = torch.rand(case.k, 2, dtype=torch.float64) * torch.tensor([img_w, img_h])
    if case.k > 3:
        wh[:2] *= 0.02  # tiny
        wh[2] *= 3.0  # larger than the image
    idx = torch.randint(0, case.n, (case.k, 1)).double()
    rois = torch.cat([idx, xy, xy + wh], dim=1)
    if case.aligned and case.k > 4:
        rois[3, [1, 3]] = rois[3, [3, 1]]  # x2 < x1: no samples (adaptive) or samples running backwards
    return feats, rois.float()


def _kw(case: Case):
    return {"spatial_scale": case.scale, "sampling_ratio": case.sampling_ratio, "aligned": case.aligned}


def _args(case: Case):
    return case.scale, case.sampling_ratio, case.aligned


def run_align(feats, rois, case: Case):
    from fastseg.triton_kernels import roi_align as tk

    if not case.small_blocks:
        return tk.roi_align(feats, rois, *case.out, *_args(case))
    blocks = {**tk._blocks(feats.shape[1], *case.out), **SMALL_BLOCKS}
    n, _, h, w = feats.shape

    class Fn(torch.autograd.Function):  # the launchers with small blocks, same math as the op
        @staticmethod
        def forward(ctx, x):
            return tk._launch_roi_gather(x, rois, *case.out, *_args(case), False, blocks)

        @staticmethod
        def backward(ctx, g):
            return tk._launch_roi_scatter(g, rois, n, h, w, *_args(case), False, blocks)

    return Fn.apply(feats)


def run_upsample(maps, rois, case: Case, mode: str):
    from fastseg.triton_kernels import roi_align as tk

    if not case.small_blocks:
        return tk.roi_upsample(maps, rois, case.n, case.h, case.w, *_args(case), mode)
    blocks = {**tk._blocks(maps.shape[1], *case.out), **SMALL_BLOCKS}
    aunet = mode == "aunet"

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, m):
            return tk._launch_roi_scatter(m, rois, case.n, case.h, case.w, *_args(case), aunet, blocks)

        @staticmethod
        def backward(ctx, g):
            return tk._launch_roi_gather(g, rois, *case.out, *_args(case), aunet, blocks)

    return Fn.apply(maps)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_roi_align_matches_reference(case):
    feats, rois = sample_inputs(case)
    x = feats.clone().requires_grad_(True)
    x64 = feats.double().requires_grad_(True)
    out = run_align(x, rois, case)
    ref = _reference.roi_align(x64, rois.double(), case.out, **_kw(case))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_matches_reference(out, ref, name="out")
    tv = torchvision.ops.roi_align(feats.double(), rois.double(), case.out, **_kw(case))
    assert_matches_reference(out, tv, name="out vs torchvision")
    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, x, grad.float())
    (g64,) = torch.autograd.grad(ref, x64, grad)
    assert_matches_reference(g, g64, name="grad features")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_roi_upsample_matches_reference(case, mode):
    _, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out)
    m = maps.clone().requires_grad_(True)
    m64 = maps.double().requires_grad_(True)
    out = run_upsample(m, rois, case, mode)
    ref = _reference.roi_upsample(m64, rois.double(), (case.h, case.w), batch_size=case.n, mode=mode, **_kw(case))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_matches_reference(out, ref, name=f"out ({mode})")
    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, m, grad.float())
    (g64,) = torch.autograd.grad(ref, m64, grad)
    assert_matches_reference(g, g64, name=f"grad roi_maps ({mode})")


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_adjoint_identity(case):
    """<up(y), x> == <y, gather(x)> for both modes: roi_align is the gather of "adjoint", the backward
    op the gather of "aunet"."""
    import fastseg.triton_kernels.roi_align as tk

    feats, rois = sample_inputs(case)
    y = torch.randn(case.k, case.c, *case.out)
    for mode in MODES:
        up = tk.roi_upsample(y, rois, case.n, case.h, case.w, *_args(case), mode)
        if mode == "adjoint":
            down = tk.roi_align(feats, rois, *case.out, *_args(case))
        else:
            down = torch.ops.fastseg._roi_upsample_triton_backward(feats, rois, *case.out, *_args(case), mode)
        lhs = (up.double() * feats.double()).sum()
        rhs = (y.double() * down.double()).sum()
        scale = (up.double().abs() * feats.double().abs()).sum()
        assert abs(lhs - rhs) <= 1e-5 * scale, f"{mode}: {lhs.item()} != {rhs.item()}"


def test_strided_inputs_and_expanded_grad():
    """channels_last features, a strided view of the maps, and sum().backward() (a stride-0 grad)."""
    from fastseg.triton_kernels import roi_align as tk

    case = CASES[0]
    feats, rois = sample_inputs(case)
    x = feats.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x64 = feats.double().requires_grad_(True)
    tk.roi_align(x, rois, *case.out, *_args(case)).sum().backward()
    ref = _reference.roi_align(x64, rois.double(), case.out, **_kw(case))
    ref.sum().backward()
    assert_matches_reference(tk.roi_align(x.detach(), rois, *case.out, *_args(case)), ref.detach())
    assert_matches_reference(x.grad, x64.grad, name="grad features")

    wide = torch.randn(case.k, case.c, case.out[0], 2 * case.out[1])
    maps = wide[..., ::2]
    m = maps.clone().requires_grad_(True)
    out = tk.roi_upsample(maps, rois, case.n, case.h, case.w, *_args(case), "aunet")
    want = _reference.roi_upsample(maps.double(), rois.double(), (case.h, case.w), batch_size=case.n, **_kw(case))
    assert_matches_reference(out, want)
    tk.roi_upsample(m, rois, case.n, case.h, case.w, *_args(case), "aunet").sum().backward()
    m64 = maps.double().requires_grad_(True)
    _reference.roi_upsample(m64, rois.double(), (case.h, case.w), batch_size=case.n, **_kw(case)).sum().backward()
    assert_matches_reference(m.grad, m64.grad, name="grad roi_maps")


def test_double_backward():
    """The backward ops are differentiable too: d<grad_x, v>/d(grad_out) = roi_align(v), and likewise."""
    from fastseg.triton_kernels import roi_align as tk

    case = CASES[1]
    feats, rois = sample_inputs(case)
    x = feats.clone().requires_grad_(True)
    out = tk.roi_align(x, rois, *case.out, *_args(case))
    y = torch.randn_like(out).requires_grad_(True)
    (gx,) = torch.autograd.grad(out, x, y, create_graph=True)
    v = torch.randn_like(gx)
    (gy,) = torch.autograd.grad(gx, y, v)
    assert torch.equal(gy, tk.roi_align(v, rois, *case.out, *_args(case)))

    m = torch.randn(case.k, case.c, *case.out, requires_grad=True)
    up = tk.roi_upsample(m, rois, case.n, case.h, case.w, *_args(case), "aunet")
    z = torch.randn_like(up).requires_grad_(True)
    (gm,) = torch.autograd.grad(up, m, z, create_graph=True)
    w = torch.randn_like(gm)
    (gz,) = torch.autograd.grad(gm, z, w)
    assert torch.equal(gz, tk.roi_upsample(w, rois, case.n, case.h, case.w, *_args(case), "aunet"))


def test_empty_inputs():
    from fastseg.triton_kernels import roi_align as tk

    feats = torch.randn(2, 3, 9, 11, requires_grad=True)
    no_rois = torch.zeros(0, 5)
    out = tk.roi_align(feats, no_rois, 7, 5, 1.0, -1, False)
    assert out.shape == (0, 3, 7, 5)
    out.sum().backward()
    assert feats.grad.shape == feats.shape and not feats.grad.any()
    up = tk.roi_upsample(torch.randn(0, 3, 7, 7), no_rois, 2, 9, 11, 1.0, -1, False, "aunet")
    assert up.shape == (2, 3, 9, 11) and not up.any()
    _, rois = sample_inputs(CASES[0])
    assert tk.roi_align(torch.randn(2, 0, 13, 17), rois, 7, 7, 1.0, -1, False).shape == (9, 0, 7, 7)
    assert tk.roi_upsample(torch.randn(9, 0, 7, 7), rois, 2, 13, 17, 1.0, -1, False, "adjoint").shape == (2, 0, 13, 17)
    empty_batch = tk.roi_upsample(torch.randn(0, 3, 7, 7), no_rois, 0, 13, 17, 1.0, -1, False, "adjoint")
    assert empty_batch.shape == (0, 3, 13, 17)


def test_rois_of_no_image_are_ignored():
    """Batch indices outside [0, N) (the public API rejects them; on a GPU nothing checks): zeros from
    roi_align, nothing added by roi_upsample, no out-of-bounds access."""
    from fastseg.triton_kernels import roi_align as tk

    case = CASES[0]
    feats, rois = sample_inputs(case)
    bad = rois.clone()
    bad[:3, 0] = torch.tensor([5.0, -1.0, 2.0])
    out = tk.roi_align(feats, bad, *case.out, *_args(case))
    assert not out[:3].any()
    torch.testing.assert_close(out[3:], tk.roi_align(feats, rois[3:], *case.out, *_args(case)))
    maps = torch.randn(case.k, case.c, *case.out)
    up = tk.roi_upsample(maps, bad, case.n, case.h, case.w, *_args(case), "aunet")
    torch.testing.assert_close(up, tk.roi_upsample(maps[3:], rois[3:], case.n, case.h, case.w, *_args(case), "aunet"))


def test_scatter_is_deterministic():
    """Many overlapping RoIs on one image: the forward scatter and roi_align's backward are bit-identical
    between runs (no atomics, a fixed order per output tile)."""
    from fastseg.triton_kernels import roi_align as tk

    torch.manual_seed(3)
    xy = torch.rand(12, 2) * 6
    rois = torch.cat([torch.zeros(12, 1), xy, xy + 6 + torch.rand(12, 2) * 8], dim=1)
    maps = torch.randn(12, 2, 7, 7)
    first = tk.roi_upsample(maps, rois, 1, 17, 19, 1.0, -1, True, "aunet")
    assert torch.equal(first, tk.roi_upsample(maps, rois, 1, 17, 19, 1.0, -1, True, "aunet"))
    x = torch.randn(1, 2, 17, 19, requires_grad=True)
    out = tk.roi_align(x, rois, 7, 7, 1.0, -1, True)
    (g1,) = torch.autograd.grad(out, x, maps, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, maps)
    assert torch.equal(g1, g2)
    assert torch.equal(g1, tk.roi_upsample(maps, rois, 1, 17, 19, 1.0, -1, True, "adjoint"))


def test_rejects_bad_arguments():
    from fastseg.triton_kernels import roi_align as tk

    _, rois = sample_inputs(CASES[0])
    with pytest.raises(ValueError, match="triton backend of roi_align supports float32"):
        tk.roi_align(torch.randn(2, 3, 13, 17, dtype=torch.float64), rois.double(), 7, 7, 1.0, -1, False)
    with pytest.raises(ValueError, match="triton backend of roi_upsample supports float32"):
        tk.roi_upsample(torch.randn(9, 3, 7, 7, dtype=torch.float64), rois.double(), 2, 13, 17, 1.0, -1, False,
                        "aunet")
    with pytest.raises(ValueError, match="mode must be one of"):
        tk.roi_upsample(torch.randn(9, 3, 7, 7), rois, 2, 13, 17, 1.0, -1, False, "bilinear")
    with pytest.raises(ValueError, match="rois must be a floating"):
        tk.roi_align(torch.randn(2, 3, 13, 17), rois[:, :4], 7, 7, 1.0, -1, False)


@pytest.mark.parametrize("mode", MODES)
def test_float16_ratio_rule(mode):
    """fp16 data (the non-IEEE dot path: tables and intermediates rounded to fp16) against the fp16
    reference, forward and gradient of both ops. (bf16 dots are not emulated by the interpreter.)"""
    from fastseg.triton_kernels import roi_align as tk

    case = CASES[0]
    feats, rois = sample_inputs(case)
    rois16 = rois.half()
    x = feats.half().requires_grad_(True)
    x64 = feats.half().double().requires_grad_(True)
    x16 = feats.half().requires_grad_(True)
    out = tk.roi_align(x, rois16, *case.out, *_args(case))
    ref = _reference.roi_align(x64, rois16.double(), case.out, **_kw(case))
    ref16 = _reference.roi_align(x16, rois16, case.out, **_kw(case))
    assert out.dtype == torch.float16
    assert_matches_reference(out, ref, ref16, name="roi_align out")
    grad = torch.randn_like(ref)
    g, g64, g16 = (torch.autograd.grad(o, t, grad.to(o.dtype))[0] for o, t in ((out, x), (ref, x64), (ref16, x16)))
    assert_matches_reference(g, g64, g16, name="grad features")

    maps = torch.randn(case.k, case.c, *case.out).half()
    m, m64, m16 = (t.requires_grad_(True) for t in (maps.clone(), maps.double(), maps.clone()))
    up = tk.roi_upsample(m, rois16, case.n, case.h, case.w, *_args(case), mode)
    size = (case.h, case.w)
    ref = _reference.roi_upsample(m64, rois16.double(), size, batch_size=case.n, mode=mode, **_kw(case))
    ref16 = _reference.roi_upsample(m16, rois16, size, batch_size=case.n, mode=mode, **_kw(case))
    assert up.dtype == torch.float16
    assert_matches_reference(up, ref, ref16, name=f"roi_upsample out ({mode})")
    grad = torch.randn_like(ref)
    g, g64, g16 = (torch.autograd.grad(o, t, grad.to(o.dtype))[0] for o, t in ((up, m), (ref, m64), (ref16, m16)))
    assert_matches_reference(g, g64, g16, name=f"grad roi_maps ({mode})")


def integer_boxes(k: int, size: tuple[int, int], out: tuple[int, int], scale: float, seed: int) -> torch.Tensor:
    """[k, 5] RoIs whose feature-space heights and widths are exact multiples (1 to 4) of the pooled
    size, at integer feature coordinates (some partly outside the map), given in image coordinates:
    bins of whole pixels, where ceil(roi / pooled) must come out exact."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(k):
        box = [0.0]
        ends = []
        for length, pooled in ((size[1], out[1]), (size[0], out[0])):  # x, then y
            extent = pooled * int(torch.randint(1, 5, (1,), generator=g))
            start = int(torch.randint(-2, max(-1, length - extent + 3), (1,), generator=g))
            box.append(start / scale)
            ends.append((start + extent) / scale)
        rows.append(box + ends)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 0.125])
def test_roi_align_integer_boxes_match_torchvision(scale, aligned):
    """Bins of exactly m pixels (adaptive grid of m samples): the sample count and positions are
    torchvision's, forward and input gradient. (Here the divisions are numpy's, IEEE either way; the
    gpu-marked twin in test_roi_align.py checks the compiled kernel, whose plain `/` is not.)"""
    from fastseg.triton_kernels import roi_align as tk

    out_size = (7, 5)
    torch.manual_seed(11)
    feats = torch.randn(1, 2, 31, 29)
    rois = integer_boxes(10, (31, 29), out_size, scale, seed=int(1 / scale) + 100 * aligned)
    x = feats.clone().requires_grad_(True)
    x64 = feats.double().requires_grad_(True)
    out = tk.roi_align(x, rois, *out_size, scale, -1, aligned)
    want = torchvision.ops.roi_align(x64, rois.double(), out_size, spatial_scale=scale, sampling_ratio=-1,
                                     aligned=aligned)
    assert_matches_reference(out, want, name="out vs torchvision")
    grad = torch.randn_like(want)
    (g,) = torch.autograd.grad(out, x, grad.float())
    (g64,) = torch.autograd.grad(want, x64, grad)
    assert_matches_reference(g, g64, name="grad features vs torchvision")


def test_float16_large_values_do_not_overflow():
    """fp16 features of magnitude 2e4..3e4 and adaptive grids of 4 to 10 samples per bin: the row band
    T = X A_x^T is rounded to fp16 for the second dot, so A_x must carry its 1 / grid_w (unnormalised
    rows would put grid_w * |x| > 65504 there: inf). Compared with torchvision in float64 at the fp16
    tolerance scaled to the data's magnitude (the fp16 PyTorch reference overflows itself)."""
    from fastseg.triton_kernels import roi_align as tk

    torch.manual_seed(5)
    mag = torch.empty(1, 2, 32, 32).uniform_(2e4, 3e4)
    sign = torch.ones_like(mag)
    sign[:, 1] = torch.randint(0, 2, (32, 32)).float() * 2 - 1  # channel 0 all positive: no cancellation
    feats = (mag * sign).half()
    xy = torch.rand(6, 2) * 6
    wh = 12 + torch.rand(6, 2) * 18  # bins of 4 to 10 pixels: adaptive grids of 4 to 10 samples
    rois = torch.cat([torch.zeros(6, 1), xy, xy + wh], dim=1)
    for aligned in (False, True):
        out = tk.roi_align(feats, rois, 3, 3, 1.0, -1, aligned)
        want = torchvision.ops.roi_align(feats.double(), rois.double(), (3, 3), spatial_scale=1.0,
                                         sampling_ratio=-1, aligned=aligned)
        assert out.dtype == torch.float16 and torch.isfinite(out).all(), f"aligned={aligned}: inf in the output"
        atol, rtol = TOL[torch.float16]
        torch.testing.assert_close(out.double() / 3e4, want / 3e4, atol=atol, rtol=rtol,
                                   msg=lambda m, a=aligned: f"aligned={a}: {m}")


@pytest.mark.parametrize("matmul_precision, expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_fp32_dot_precision_follows_torch(monkeypatch, matmul_precision, expected):
    """The gather and scatter dots of fp32 data take torch.get_float32_matmul_precision() (fp16 data:
    Triton's default "tf32", which fp16 operands ignore). The interpreter computes every dot in fp32
    whatever the precision, so this checks what the launchers pass."""
    from fastseg.triton_kernels import roi_align as tk

    seen: dict[str, list[str]] = {}
    launchable = tk._kernel

    def spy(fn):
        launch = launchable(fn)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    if "PRECISION" in kwargs:
                        seen.setdefault(fn.__name__, []).append(kwargs["PRECISION"])
                    return launch[grid](*args, **kwargs)
                return run
        return Grid()

    monkeypatch.setattr(tk, "_kernel", spy)
    case = CASES[1]
    feats, rois = sample_inputs(case)
    maps = torch.randn(case.k, case.c, *case.out)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        out = tk.roi_align(feats, rois, *case.out, *_args(case))
        up = tk.roi_upsample(maps, rois, case.n, case.h, case.w, *_args(case), "aunet")
        tk.roi_align(feats.half(), rois, *case.out, *_args(case))
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == {"_roi_gather_kernel": [expected, "tf32"], "_roi_scatter_kernel": [expected]}
    assert_matches_reference(out, _reference.roi_align(feats.double(), rois.double(), case.out, **_kw(case)))
    assert_matches_reference(up, _reference.roi_upsample(maps.double(), rois.double(), (case.h, case.w),
                                                         batch_size=case.n, **_kw(case)))


def test_huge_and_non_finite_boxes():
    """Boxes that bypass the public checks (torch.ops / torch.compile): ~1000 px and 1e6 px (fixed
    sampling_ratio) boxes give torchvision's values; a 1e6 px adaptive box (1.4e5 samples per bin axis)
    only visits the samples near the map and matches the float64 reference, whose span is checked by
    enumeration in test_roi_align.py; non-finite boxes give zeros / are dropped, finite neighbours
    unaffected."""
    from fastseg.triton_kernels import roi_align as tk

    torch.manual_seed(4)
    feats = torch.randn(2, 2, 11, 13)
    rois = torch.tensor([[0, -400.0, -300.0, 700.0, 600.0], [1, -900.3, 2.0, 5.0, 800.0],
                         [1, 3.0, 4.0, 1200.0, 9.0]])
    for sr, r in ((-1, rois), (2, rois * torch.tensor([1, 1e3, 1e3, 1e3, 1e3]))):
        out = tk.roi_align(feats, r, 5, 4, 1.0, sr, False)
        want = torchvision.ops.roi_align(feats.double(), r.double(), (5, 4), sampling_ratio=sr)
        assert_matches_reference(out, want, name=f"sampling_ratio={sr}")
    huge = torch.tensor([[0, -4e5, -5e5, 6e5, 5e5], [1, 2.0, 1.0, 8.0, 9.0]])
    for aligned in (False, True):
        out = tk.roi_align(feats, huge, 7, 7, 1.0, -1, aligned)
        want = _reference.roi_align(feats.double(), huge.double(), (7, 7), aligned=aligned)
        assert_matches_reference(out, want, name=f"1e6 px box, aligned={aligned}")
    bad = torch.tensor([[0, 1.0, 2.0, 9.0, 7.0], [0, float("inf"), 0, 5, 5], [1, 0, 0, float("inf"), 5],
                        [0, float("nan"), 1, 4, 4], [1, -float("inf"), 0, float("inf"), 5],
                        [0, -3e38, -3e38, 3e38, 3e38]])
    out = tk.roi_align(feats, bad, 3, 3, 1.0, -1, False)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    torch.testing.assert_close(out[:1], torchvision.ops.roi_align(feats, bad[:1], (3, 3)))
    maps = torch.randn(len(bad), 2, 3, 3)
    up = tk.roi_upsample(maps, bad, 2, 11, 13, 1.0, -1, False, "aunet")
    want = _reference.roi_upsample(maps[:1].double(), bad[:1].double(), (11, 13), batch_size=2)
    assert_matches_reference(up, want, name="roi_upsample drops non-finite boxes")
