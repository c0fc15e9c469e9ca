"""Triton backends of DANet's position attention (PAM) and channel attention (CAM) under
TRITON_INTERPRET=1 (CPU tensors, fp32), against the float64 reference: forward, lse, every gradient,
strided inputs (both paths of hw_offsets), small blocks (many tiles and channel chunks), wide key
widths (Ck = 128, 256: several BLOCK_D chunks), split Gram products, empty batches, N = 1, large
energies, determinism; and the launch settings the GPU depends on (bounded tiles, dot precision,
unspecialised shapes), checked on what the launchers pass.

The public functions of ``fastseg.triton_kernels`` are called directly (not through fastseg.ops).
Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_attention_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_matches_reference

from fastseg.ops import _reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]


def _seed(case) -> None:
    torch.manual_seed(zlib.crc32(str(case).encode()))


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory format: channels_last, a view every other column (H and W
    still collapse into one axis: hw_offsets' FLAT path), or the first W columns of a wider tensor
    (they do not: the general path)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "cropped":
        wide = torch.empty(*t.shape[:3], t.shape[3] + 3, dtype=t.dtype)
        wide[..., :t.shape[3]] = t
        return wide[..., :t.shape[3]]
    return t


def _spy_launches(monkeypatch, module) -> list[tuple[str, tuple, dict]]:
    """Record (kernel name, grid, keyword arguments) of every launch that ``module`` makes."""
    launches = []
    real = module._kernel

    def kernel(fn):
        launchable = real(fn)

        class Spy:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    launches.append((fn.fn.__name__, tuple(grid), kwargs))
                    return launchable[grid](*args, **kwargs)
                return run
        return Spy()

    monkeypatch.setattr(module, "_kernel", kernel)
    return launches


def _leaf(t: torch.Tensor, layout: str = "contiguous") -> torch.Tensor:
    return _layout(t.detach().float(), layout).requires_grad_(True)


# ---- position attention -------------------------------------------------------------------------


@dataclass(frozen=True)
class PamCase:
    b: int
    ck: int
    c: int
    h: int
    w: int
    std: float = 1.0  # std 3 with Ck = 64: energies in the hundreds
    layout: str = "contiguous"
    small_blocks: bool = False  # 16-wide tiles: many query / key / channel blocks on a tiny shape

    def __str__(self) -> str:
        return (f"b{self.b}ck{self.ck}c{self.c}_{self.h}x{self.w}_std{self.std:g}_{self.layout}"
                + ("_small" if self.small_blocks else ""))


# N never a multiple of a block; H or W = 1; Ck in {1, 3, 8, 17, 40, 64, 128, 256}; C in {5, 20, 33,
# 70}. With the fp32 blocks, C <= 32 takes the fused dK/dV pass and C > 32 the split one; C = 70 > 64
# also splits the forward over two channel programs; N = 99 and 65 span several query and key
# blocks. Ck = 128 and 256 are 2 and 4 BLOCK_D = 64 chunks (WIDE_D: dK and dQ split by chunk); the
# small blocks (BLOCK_D = 16) cut Ck = 17 and 40 into ragged chunks and C into several dP chunks.
PAM_CASES = [
    PamCase(2, 3, 5, 7, 9),
    PamCase(1, 1, 7, 5, 1),
    PamCase(2, 8, 33, 1, 11, layout="channels_last"),
    PamCase(1, 17, 70, 9, 11, std=3.0),
    PamCase(1, 64, 33, 5, 13, std=3.0, layout="strided"),
    PamCase(2, 17, 70, 3, 7, small_blocks=True),
    PamCase(1, 40, 20, 5, 7, layout="cropped", small_blocks=True),
    PamCase(1, 128, 9, 5, 7),
    PamCase(2, 256, 33, 3, 5, std=0.5, layout="channels_last"),
    PamCase(1, 5, 3, 1, 1),  # N = 1
    PamCase(0, 8, 16, 9, 9),  # empty batch
]

SMALL_PAM_BLOCKS = dict(BLOCK_D=16, FWD_M=16, FWD_N=16, FWD_C=16, FWD_WARPS=4, FWD_STAGES=1,
                        BWD_M=16, BWD_N=16, BLOCK_CB=16, BLOCK_CV=32, BWD_WARPS=4, BWD_STAGES=1)


def pam_inputs(case: PamCase):
    """Float64 q, k, v (fresh, never zero)."""
    _seed(case)
    q = torch.randn(case.b, case.ck, case.h, case.w, dtype=torch.float64) * case.std
    k = torch.randn(case.b, case.ck, case.h, case.w, dtype=torch.float64) * case.std
    v = torch.randn(case.b, case.c, case.h, case.w, dtype=torch.float64)
    return q, k, v


def run_pam(q, k, v, small_blocks: bool = False):
    from fastseg.triton_kernels import position_attention as tk

    if not small_blocks:
        return tk.position_attention(q, k, v)
    blocks = {**tk._blocks(q.shape[1], v.shape[1], q.dtype), **SMALL_PAM_BLOCKS}

    class Fn(torch.autograd.Function):  # the launchers with 16-wide blocks, same math as the op
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = tk._launch_position_attention_fwd(q, k, v, blocks)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, g, _):
            return tk._launch_position_attention_bwd(g.contiguous(), *ctx.saved_tensors, blocks)

    return Fn.apply(q, k, v)


@pytest.mark.parametrize("case", PAM_CASES, ids=[str(c) for c in PAM_CASES])
def test_position_attention_matches_reference(case):
    q64, k64, v64 = (t.requires_grad_(True) for t in pam_inputs(case))
    q, k, v = (_leaf(t, case.layout) for t in (q64, k64, v64))
    out, lse = run_pam(q, k, v, case.small_blocks)
    ref = _reference.position_attention(q64, k64, v64)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert not lse.requires_grad and lse.dtype == torch.float32
    assert_matches_reference(out, ref, name="out")
    energy = torch.bmm(q64.detach().flatten(2).transpose(1, 2), k64.detach().flatten(2))
    assert_matches_reference(lse, energy.logsumexp(-1), name="lse")
    if out.numel() == 0:
        return
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad.float())
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), grad)
    for name, g, g64 in zip("qkv", grads, grads64, strict=True):
        assert_matches_reference(g, g64, name=f"grad {name}")


@pytest.mark.parametrize("b", [0, 2])
def test_position_attention_sum_backward(b):
    """out.sum().backward(): the incoming grad is an expanded (stride-0) tensor; B = 0 too."""
    case = PamCase(b, 8, 16, 5, 3)
    q64, k64, v64 = (t.requires_grad_(True) for t in pam_inputs(case))
    q, k, v = (_leaf(t) for t in (q64, k64, v64))
    out, _ = run_pam(q, k, v)
    out.sum().backward()
    _reference.position_attention(q64, k64, v64).sum().backward()
    for name, t, t64 in (("q", q, q64), ("k", k, k64), ("v", v, v64)):
        assert_matches_reference(t.grad, t64.grad, name=f"grad {name}")


def test_position_attention_large_energies_stay_finite():
    """std 6 and Ck = 64: energies of several hundred to a thousand; exp() of them overflows fp32
    unless the running maximum is subtracted."""
    case = PamCase(1, 64, 5, 7, 5, std=6.0)
    q64, k64, v64 = (t.requires_grad_(True) for t in pam_inputs(case))
    q, k, v = (_leaf(t) for t in (q64, k64, v64))
    out, lse = run_pam(q, k, v)
    assert lse.abs().max() > 300
    ref = _reference.position_attention(q64, k64, v64)
    assert_matches_reference(out, ref)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    # The gradients are sums of exp-weighted products of magnitude ~ the energies: scale atol with them.
    for g, g64 in zip(grads, grads64, strict=True):
        torch.testing.assert_close(g.double(), g64, atol=1e-4 * (1 + g64.abs().max().item()), rtol=1e-4)


def test_position_attention_backward_is_deterministic():
    case = PamCase(1, 17, 70, 9, 11, std=3.0)
    q, k, v = (_leaf(t) for t in pam_inputs(case))
    out, _ = run_pam(q, k, v)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_position_attention_backward_op():
    """The backward op on its own: contiguous grads in the inputs' shapes, equal to autograd's."""
    case = PamCase(2, 3, 33, 5, 7)
    q, k, v = (_leaf(t) for t in pam_inputs(case))
    out, lse = torch.ops.fastseg.position_attention_triton(q, k, v)
    grad = torch.randn_like(out)
    gq, gk, gv = torch.ops.fastseg._position_attention_triton_backward(grad, q, k, v, out, lse)
    assert gq.shape == q.shape and gk.shape == k.shape and gv.shape == v.shape
    for a, b in zip((gq, gk, gv), torch.autograd.grad(out, (q, k, v), grad), strict=True):
        assert torch.equal(a, b)


def test_position_attention_float16_ratio_rule():
    """fp16 operands (the non-IEEE dot path, P and dS rounded to fp16) against the fp16 reference."""
    case = PamCase(2, 8, 70, 7, 9)
    ts64 = [t.requires_grad_(True) for t in pam_inputs(case)]
    ref = _reference.position_attention(*ts64)
    grad = torch.randn_like(ref)
    grads64 = torch.autograd.grad(ref, ts64, grad)
    ts16 = [t.detach().half().requires_grad_(True) for t in ts64]
    ref16 = _reference.position_attention(*ts16)
    grads_ref16 = torch.autograd.grad(ref16, ts16, grad.half())
    ts = [t.detach().half().requires_grad_(True) for t in ts64]
    out, _ = run_pam(*ts)
    assert out.dtype == torch.float16
    assert_matches_reference(out, ref, ref16, name="out")
    for name, g, g64, g16 in zip("qkv", torch.autograd.grad(out, ts, grad.half()), grads64, grads_ref16, strict=True):
        assert_matches_reference(g, g64, g16, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_position_attention_tiles_are_bounded(dtype):
    """No tile grows with Ck or C (BLOCK_D = Ck once needed ~224 KB of shared memory at Ck = 512 in
    fp16): the key width is cut into chunks of 16 to 64, the value width into chunks of <= 128; a
    forward program takes all value channels of its queries up to C = 128 in fp16 / bf16 (64 in fp32),
    so DANet's C = 512 computes each energy 4 times (512 / 128), not 32 (512 / 16)."""
    from fastseg.triton_kernels import position_attention as tk

    for ck in (1, 17, 64, 512, 2048):
        for c in (1, 70, 512, 2048):
            bs = tk._blocks(ck, c, dtype)
            assert 16 <= bs["BLOCK_D"] <= 64 and (bs["BLOCK_D"] >= ck or bs["BLOCK_D"] == 64)
            for name in ("BLOCK_D", "FWD_M", "FWD_N", "FWD_C", "BWD_M", "BWD_N", "BLOCK_CB", "BLOCK_CV", "PRE_C"):
                assert 16 <= bs[name] <= 128 and bs[name] & (bs[name] - 1) == 0, name
    widest = 64 if dtype == torch.float32 else 128
    assert tk._blocks(64, 512, dtype)["FWD_C"] == widest
    assert tk._blocks(64, widest, dtype)["FWD_C"] >= widest


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_position_attention_launch_settings(monkeypatch, precision, expected):
    """What the launchers pass: PRECISION from torch.get_float32_matmul_precision() (no IEEE flag),
    WIDE_D and a grid over the key-width chunks for Ck > BLOCK_D, hw_offsets' FLAT path for contiguous
    and channels_last tensors and for the expanded grad of out.sum(), the general path for a crop."""
    from fastseg.triton_kernels import position_attention as tk

    launches = _spy_launches(monkeypatch, tk)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        for layout, flat in (("contiguous", True), ("channels_last", True), ("cropped", False)):
            launches.clear()
            case = PamCase(1, 80, 40, 3, 5, layout=layout)  # Ck = 80: two 64-wide chunks
            q, k, v = (_leaf(t, layout) for t in pam_inputs(case))
            out, _ = run_pam(q, k, v)
            out.sum().backward()
            names = [name for name, _, _ in launches]
            assert names.count("_position_attention_bwd_dkdv_kernel") == 2  # dV, then dK by chunk
            for name, grid, kw in launches:
                assert "IEEE" not in kw
                for key in ("Q_FLAT", "K_FLAT", "V_FLAT"):
                    assert kw.get(key, flat) == flat, (name, key)
                assert kw.get("O_FLAT", True) and kw.get("DO_FLAT", True)  # out; the expanded grad
                if name != "_position_attention_bwd_preprocess_kernel":
                    assert kw["PRECISION"] == expected and kw["WIDE_D"] and kw["BLOCK_D"] == 64
                if name == "_position_attention_bwd_dq_kernel" or kw.get("DK") and not kw.get("DV"):
                    assert grid[1] == 2, name
    finally:
        torch.set_float32_matmul_precision(old)


def test_position_attention_rejects_unsupported_dtype():
    from fastseg.triton_kernels import position_attention as tk

    q, k, v = pam_inputs(PamCase(1, 3, 5, 4, 4))
    with pytest.raises(ValueError, match="triton backend of position_attention supports float32"):
        tk.position_attention(q, k, v)


# ---- channel attention --------------------------------------------------------------------------


@dataclass(frozen=True)
class CamCase:
    b: int
    c: int
    h: int
    w: int
    std: float = 1.0
    layout: str = "contiguous"
    small_blocks: bool = False

    def __str__(self) -> str:
        return (f"b{self.b}c{self.c}_{self.h}x{self.w}_std{self.std:g}_{self.layout}"
                + ("_small" if self.small_blocks else ""))


# C = 70 spans two 64-wide Gram tiles (the mirrored, symmetric case) and several product tiles. The
# small blocks split N over Gram programs from N = 32 on (N = 65: chunks of 32, 32 and 1 positions).
CAM_CASES = [
    CamCase(2, 5, 7, 9),
    CamCase(1, 70, 9, 11),
    CamCase(2, 33, 1, 13, layout="channels_last"),
    CamCase(1, 17, 5, 1, std=3.0, layout="strided"),
    CamCase(2, 20, 7, 9, layout="cropped"),
    CamCase(2, 37, 3, 7, small_blocks=True),
    CamCase(1, 37, 5, 13, std=2.0, layout="cropped", small_blocks=True),
    CamCase(1, 3, 1, 1),  # N = 1
    CamCase(0, 16, 9, 9),  # empty batch
]

SMALL_CAM_BLOCKS = dict(GRAM=16, GRAM_K=16, GRAM_WARPS=4, GRAM_STAGES=1, GRAM_PROGRAMS=512, GRAM_MIN_N=16,
                        MM_I=16, MM_J=16, MM_K=16, MM_WARPS=4, MM_STAGES=1, SM_R=2, SM_C=16)


def cam_input(case: CamCase) -> torch.Tensor:
    _seed(case)
    return torch.randn(case.b, case.c, case.h, case.w, dtype=torch.float64) * case.std


def run_cam(x, small_blocks: bool = False):
    from fastseg.triton_kernels import channel_attention as tk

    if not small_blocks:
        return tk.channel_attention(x)

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return tk._launch_channel_attention_fwd(x, SMALL_CAM_BLOCKS)

        @staticmethod
        def backward(ctx, g):
            return tk._launch_channel_attention_bwd(g.contiguous(), *ctx.saved_tensors, SMALL_CAM_BLOCKS)

    return Fn.apply(x)


@pytest.mark.parametrize("case", CAM_CASES, ids=[str(c) for c in CAM_CASES])
def test_channel_attention_matches_reference(case):
    x64 = cam_input(case).requires_grad_(True)
    x = _leaf(x64, case.layout)
    out = run_cam(x, case.small_blocks)
    ref = _reference.channel_attention(x64)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert_matches_reference(out, ref, name="out")
    if out.numel() == 0:
        return
    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, (x,), grad.float())
    (g64,) = torch.autograd.grad(ref, (x64,), grad)
    assert_matches_reference(g, g64, name="grad x")


def test_channel_attention_kernels_on_their_own():
    """The Gram (symmetric and not), the row softmax and the two-term product against float64."""
    from fastseg.triton_kernels import channel_attention as tk

    torch.manual_seed(1)
    p, q = torch.randn(2, 37, 5, 7), torch.randn(2, 37, 5, 7)
    bs = tk._blocks(37, 35, torch.float32)
    for small in (False, True):
        blocks = SMALL_CAM_BLOCKS if small else bs
        p64, q64 = p.double().flatten(2), q.double().flatten(2)
        e = tk._launch_gram(p, p, blocks)
        torch.testing.assert_close(e.double(), p64 @ p64.transpose(1, 2), atol=1e-4, rtol=1e-5)
        assert torch.equal(e, e.transpose(1, 2))
        e2 = tk._launch_gram(p, q, blocks)
        torch.testing.assert_close(e2.double(), p64 @ q64.transpose(1, 2), atol=1e-4, rtol=1e-5)
        a = tk._launch_softmax_(e2.clone(), blocks)
        torch.testing.assert_close(a.double(), torch.softmax(-e2.double(), -1), atol=1e-6, rtol=1e-5)
        out = tk._launch_matmul(a.transpose(1, 2), p, blocks, e2, q)
        ref = a.double().transpose(1, 2) @ p64 + e2.double() @ q64
        torch.testing.assert_close(out.double().flatten(2), ref, atol=1e-4, rtol=1e-5)


def test_channel_attention_large_energies_stay_finite():
    """E ~ thousands: softmax(-E) needs the row minimum subtracted."""
    x64 = (cam_input(CamCase(1, 6, 11, 13)) * 4).requires_grad_(True)
    x = _leaf(x64)
    out = run_cam(x)
    assert torch.isfinite(out).all()
    assert_matches_reference(out, _reference.channel_attention(x64))
    (g,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    assert torch.isfinite(g).all()


def test_channel_attention_backward_is_deterministic():
    x = _leaf(cam_input(CamCase(1, 70, 9, 11)))
    out = run_cam(x)
    grad = torch.randn_like(out)
    (first,) = torch.autograd.grad(out, (x,), grad, retain_graph=True)
    (second,) = torch.autograd.grad(out, (x,), grad)
    assert torch.equal(first, second)
    assert torch.equal(torch.ops.fastseg._channel_attention_triton_backward(grad, x.detach()), first)
    # Split Gram products: the partials are summed in a fixed order.
    x = _leaf(cam_input(CamCase(1, 37, 5, 13)))
    out = run_cam(x, small_blocks=True)
    assert torch.equal(out, run_cam(x, small_blocks=True))
    grad = torch.randn_like(out)
    first, second = (torch.autograd.grad(run_cam(x, small_blocks=True), (x,), grad)[0] for _ in range(2))
    assert torch.equal(first, second)


def test_channel_attention_gram_splits():
    """The Gram of DANet's C = 512 has 36 tiles on and above the diagonal: N is split so that the
    launch has hundreds of programs (an H100 has 132 SMs), in whole GRAM_K steps; a batch that fills
    the GPU by itself is not split."""
    from fastseg.triton_kernels import channel_attention as tk

    for dtype in (torch.float16, torch.float32):
        for side in (64, 96, 128):
            n = side * side
            bs = tk._blocks(512, n, dtype)
            for symmetric, tiles in ((True, 36), (False, 64)):
                splits, chunk = tk._gram_split(1, 512, n, symmetric, bs)
                assert splits * tiles >= 256, (dtype, side, symmetric, splits)
                assert chunk % bs["GRAM_K"] == 0 and (splits - 1) * chunk < n <= splits * chunk
        assert tk._gram_split(16, 512, 96 * 96, True, tk._blocks(512, 96 * 96, dtype)) == (1, 96 * 96)
    assert tk._gram_split(1, 37, 65, True, SMALL_CAM_BLOCKS) == (3, 32)


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_channel_attention_launch_settings(monkeypatch, precision, expected):
    """What the launchers pass: PRECISION from torch.get_float32_matmul_precision() (no IEEE flag),
    hw_offsets' FLAT path for contiguous and channels_last tensors and for the expanded grad of
    out.sum(), the general path for a crop; the forward and backward Gram split over N."""
    from fastseg.triton_kernels import channel_attention as tk

    launches = _spy_launches(monkeypatch, tk)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        for layout, flat in (("contiguous", True), ("channels_last", True), ("cropped", False)):
            launches.clear()
            x = _leaf(cam_input(CamCase(1, 37, 5, 13)), layout)
            run_cam(x, small_blocks=True).sum().backward()
            grams = [(grid, kw) for name, grid, kw in launches if name == "_channel_attention_gram_kernel"]
            assert [kw["SYMMETRIC"] for _, kw in grams] == [True, True, False]  # fwd A, bwd A, dA
            assert all(grid[2] == 3 for grid, _ in grams)
            for name, _, kw in launches:
                assert "IEEE" not in kw
                if name != "_channel_attention_softmax_kernel":
                    assert kw["PRECISION"] == expected, name
                # x takes the layout's path; grad_out (the first operand of the dA Gram and of the
                # two-term product) is contiguous or expanded: flat.
                if name == "_channel_attention_gram_kernel":
                    assert kw["Q_FLAT"] == flat and kw["P_FLAT"] == (flat or not kw["SYMMETRIC"])
                if name == "_channel_attention_matmul_kernel":
                    assert kw["R2_FLAT"] == flat and kw["R_FLAT"] == (flat or kw["TWO"])
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.parametrize("module", ["position_attention", "channel_attention"])
def test_kernels_do_not_specialize_shapes(module):
    """Cold-cache compile time: the sizes that carry no layout information (W, which only the general
    hw_offsets path reads; the Gram's batch B; the softmax's row count R) are not specialised (== 1 /
    % 16). N, Ck and C are, like the strides: they bound the masks along the contiguous axis (ptxas for
    sm_90a: unspecialised N loses vector loads and cp.async pipelining at N = 4096), and the strides
    already carry their divisibility, so they add no variants."""
    import importlib

    mod = importlib.import_module(f"fastseg.triton_kernels.{module}")
    kernels = [getattr(mod, n) for n in dir(mod) if n.startswith(f"_{module}_") and n.endswith("_kernel")]
    assert len(kernels) >= 3
    for k in kernels:
        names = set(k.kwargs["do_not_specialize"] or [])
        args = set(k.arg_names)
        assert names and names <= args and names & {"W", "B", "R"} == names, k.fn.__name__
        assert "W" not in args or "W" in names, k.fn.__name__
        assert not names & {"N", "Ck", "C"}, k.fn.__name__
        assert not {n for n in names if n.startswith("s")}, "strides stay specialised"


@pytest.mark.parametrize("b", [0, 2])
def test_channel_attention_sum_backward(b):
    """out.sum().backward(): the incoming grad is an expanded (stride-0) tensor; B = 0 too."""
    x64 = cam_input(CamCase(b, 16, 5, 3)).requires_grad_(True)
    x = _leaf(x64)
    run_cam(x).sum().backward()
    _reference.channel_attention(x64).sum().backward()
    assert_matches_reference(x.grad, x64.grad, name="grad x")


def test_channel_attention_float16_ratio_rule():
    """fp16 x: fp16 Gram operands, fp32 E and A, the product with A in fp32 (TF32 on a GPU)."""
    x64 = cam_input(CamCase(2, 37, 5, 7)).requires_grad_(True)
    ref = _reference.channel_attention(x64)
    grad = torch.randn_like(ref)
    (g64,) = torch.autograd.grad(ref, (x64,), grad)
    x16 = x64.detach().half().requires_grad_(True)
    ref16 = _reference.channel_attention(x16)
    (g_ref16,) = torch.autograd.grad(ref16, (x16,), grad.half())
    x = x64.detach().half().requires_grad_(True)
    out = run_cam(x)
    assert out.dtype == torch.float16
    assert_matches_reference(out, ref, ref16, name="out")
    (g,) = torch.autograd.grad(out, (x,), grad.half())
    assert_matches_reference(g, g64, g_ref16, name="grad x")


def test_channel_attention_rejects_unsupported_dtype():
    from fastseg.triton_kernels import channel_attention as tk

    with pytest.raises(ValueError, match="triton backend of channel_attention supports float32"):
        tk.channel_attention(cam_input(CamCase(1, 3, 4, 4)))
