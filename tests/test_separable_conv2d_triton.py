"""Triton backend of separable_conv2d under TRITON_INTERPRET=1 (CPU tensors, fp32), against the
float64 reference: forward, every gradient, the depthwise kernels on their own, determinism.

Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_separable_conv2d_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F
import test_separable_conv2d as base
from conftest import assert_matches_reference

from fastseg import ops
from fastseg.ops import _reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]


# The op's shared cases and sample_inputs; the largest are too slow for the interpreter.
CASES = [c for c in base.CASES if c.c * c.o <= 6000]


def seed(case) -> None:
    torch.manual_seed(zlib.crc32(str(case).encode()))


def sample_inputs(case, requires_grad: bool = False):
    return base.sample_inputs(case, "cpu", torch.float32, requires_grad)


tensors_of, as_double = base.tensors_of, base.as_double


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_reference(case):
    base.check_forward_backward(case, "triton", "cpu", torch.float32)


def test_grads_of_a_subset_of_inputs():
    """Only x and pw_scale require grad: the others get none, the result still matches."""
    case = CASES[0]
    seed(case)
    args, kwargs = sample_inputs(case)
    args[0].requires_grad_(True)
    kwargs["pw_scale"].requires_grad_(True)
    out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    args64, kwargs64 = as_double(args, kwargs)
    ref64 = _reference.separable_conv2d(*args64, **kwargs64)
    grad = torch.randn_like(ref64)
    out.backward(grad.float())
    ref64.backward(grad)
    assert args[1].grad is None and kwargs["dw_scale"].grad is None
    assert_matches_reference(args[0].grad, args64[0].grad, name="grad x")
    assert_matches_reference(kwargs["pw_scale"].grad, kwargs64["pw_scale"].grad, name="grad pw_scale")


def test_backward_is_deterministic():
    case = CASES[1]
    seed(case)
    args, kwargs = sample_inputs(case, requires_grad=True)
    leaves = tensors_of(args, kwargs)
    out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backward_op_returns_empty_for_absent_affines():
    case = base.Case(1, 3, 2, 5, 5, affine="dw")
    seed(case)
    args, kwargs = sample_inputs(case)
    out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    grads = torch.ops.fastseg._separable_conv2d_triton_backward(
        torch.randn_like(out), *args, kwargs["dw_scale"], kwargs["dw_shift"], None, None,
        1, 1, 1, 1, True, True)
    assert [tuple(g.shape) for g in grads] == [(1, 3, 5, 5), (3, 1, 3, 3), (2, 3, 1, 1), (3,), (3,), (0,), (0,)]


# ---- the depthwise kernels on their own --------------------------------------------------------

DW_GEOMETRY = [  # (n, c, h, w, k, stride, pad_beg, pad_end, dilation)
    (2, 5, 9, 13, 3, 1, 1, 1, 1),
    (1, 17, 13, 9, 5, 2, 4, 3, 2),
    (3, 3, 7, 7, 3, 3, 0, 2, 2),  # stride 3: many inputs get no tap
]


@pytest.mark.parametrize("geom", DW_GEOMETRY, ids=[str(g) for g in DW_GEOMETRY])
def test_depthwise_kernels(geom):
    from fastseg.triton_kernels import separable_conv2d as tk

    n, c, h, w, k, s, pb, pe, d = geom
    torch.manual_seed(zlib.crc32(str(geom).encode()))
    x = torch.randn(n, c, h, 2 * w)[..., ::2]  # strided x
    wt = torch.randn(c, 1, k, k)
    x64 = x.double().requires_grad_(True)
    w64 = wt.double().requires_grad_(True)
    ref = F.conv2d(F.pad(x64, (pb, pe, pb, pe)), w64, stride=s, dilation=d, groups=c)
    a = tk._launch_depthwise_fwd(x, wt, s, pb, pe, d)
    torch.testing.assert_close(a.double(), ref, atol=1e-5, rtol=1e-5)

    g = torch.randn(ref.shape, dtype=torch.float64)
    gx64, gw64 = torch.autograd.grad(ref, (x64, w64), g)
    gx = tk._launch_depthwise_bwd_input(g.float().contiguous(), wt, h, w, s, pb, d)
    torch.testing.assert_close(gx.double(), gx64, atol=1e-5, rtol=1e-5)
    # One chunk, and the N*Ho*Wo reduction cut into several (must agree, deterministically).
    for split in (1, 3):
        gw = tk._launch_depthwise_bwd_weight(g.float().contiguous(), x, k, s, pb, d, split=split)
        torch.testing.assert_close(gw.double(), gw64, atol=1e-4, rtol=1e-4)


def test_rejects_unsupported_dtype():
    x, dw, pw = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(3, 1, 3, 3, dtype=torch.float64), \
        torch.randn(2, 3, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton backend of separable_conv2d supports float32"):
        ops.separable_conv2d(x, dw, pw, backend="triton")


# ---- output-channel groups, launch configuration, precision ------------------------------------------

# O above one group of 256 and not a multiple of it; k = 3 and 5, dilation, stride 2, ragged sizes.
WIDE = [
    base.Case(2, 6, 300, 9, 7, stride=2, dilation=2),
    base.Case(1, 5, 263, 7, 11, k=5, dilation=3, affine="pw", dw_relu=False, layout="channels_last"),
]


@pytest.mark.parametrize("case", WIDE, ids=[str(c) for c in WIDE])
def test_wide_output_matches_reference(case):
    base.check_forward_backward(case, "triton", "cpu", torch.float32)


def _force_config(monkeypatch, **over):
    """Make the forward launcher use ``over`` on top of its own choice (small tiles on CPU)."""
    from fastseg.triton_kernels import separable_conv2d as tk

    pick = tk._fwd_config
    monkeypatch.setattr(tk, "_fwd_config", lambda *a: {**pick(*a), **over})


FORCED = [  # (case, forced blocks): several output-channel groups and pixel tiles, ragged last ones
    (base.Case(2, 21, 40, 9, 7, stride=2, dilation=2), dict(BLOCK_O=16, BLOCK_P=16)),
    (base.Case(1, 17, 37, 8, 11, k=5, layout="strided"), dict(BLOCK_O=16, BLOCK_P=32)),
    (base.Case(3, 5, 19, 5, 6, k=3, dilation=2, affine="dw", relu=False), dict(BLOCK_O=16, BLOCK_P=16)),
]


@pytest.mark.parametrize("case,blocks", FORCED, ids=[str(c) for c, _ in FORCED])
def test_forward_over_output_channel_groups(monkeypatch, case, blocks):
    _force_config(monkeypatch, **blocks)
    seed(case)
    args, kwargs = sample_inputs(case)
    out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    args64, kwargs64 = as_double(args, kwargs)
    assert_matches_reference(out, _reference.separable_conv2d(*args64, **kwargs64))


def test_fill_rule_on_a_large_gpu_matches_reference(monkeypatch):
    """With an H100's 132 SMs and batch 1, the launcher narrows the pixel tile, then the groups."""
    from fastseg.triton_kernels import separable_conv2d as tk

    monkeypatch.setattr(tk, "_sm_count", lambda device: 132)
    case = base.Case(1, 7, 150, 6, 5, dilation=2)
    assert tk._fwd_config(1, 150, 30, 3, torch.float16, torch.device("cpu"))["BLOCK_O"] == 64
    base.check_forward_backward(case, "triton", "cpu", torch.float32)


CONFIG_SHAPES = [(n, oc, p, k) for n in (1, 8) for oc in (7, 64, 130, 256, 728, 2048)
                 for p in (1, 100, 1089, 16641) for k in (3, 5)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_forward_config_bounds(monkeypatch, dtype):
    """Every GPU choice: powers of two, tl.dot's >= 16, accumulator <= 8192 fp32 (4096 with the
    exact fp32 dot), pixel tile <= 16 at k > 3, one group when OC <= 256 and the grid is full."""
    from fastseg.triton_kernels import separable_conv2d as tk

    monkeypatch.setattr(tk, "_sm_count", lambda device: 132)
    for n, oc, p, k in CONFIG_SHAPES:
        cfg = tk._fwd_config(n, oc, p, k, dtype, torch.device("cuda"))
        bo, bp = cfg["BLOCK_O"], cfg["BLOCK_P"]
        ieee = cfg["PRECISION"] == "ieee"
        for b in (bo, bp, cfg["BLOCK_C"]):
            assert b >= 16 and b & (b - 1) == 0, cfg
        assert bo * bp <= (4096 if ieee else 8192) and bo <= (128 if ieee else 256), cfg
        assert bp <= (16 if k > 3 else 32 if ieee else 64), cfg
        full = min(max(16, 1 << (oc - 1).bit_length()), 128 if ieee else 256)
        if bo < full:  # more groups (depthwise recomputed) only when 16-pixel tiles cannot fill the GPU
            assert bp == 16 and n * -(-p // 16) * -(-oc // (2 * bo)) < 132, cfg


@pytest.mark.parametrize("precision,expected", [("highest", "ieee"), ("high", "tf32x3"), ("medium", "tf32")])
def test_fp32_dot_precision_follows_torch(monkeypatch, precision, expected):
    """The launch passes torch.get_float32_matmul_precision()'s tl.dot input precision (the
    interpreter computes every precision exactly, so only the GPU sees the difference)."""
    from fastseg.triton_kernels import separable_conv2d as tk

    seen = []
    real = tk.kernel

    def spy(fn):
        launch = real(fn)

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    seen.append((fn.__name__, kwargs.get("PRECISION")))
                    return launch[grid](*args, **kwargs)
                return run
        return Grid()

    monkeypatch.setattr(tk, "kernel", spy)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        case = CASES[0]
        seed(case)
        args, kwargs = sample_inputs(case)
        out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    finally:
        torch.set_float32_matmul_precision(old)
    assert ("_separable_conv2d_fwd_kernel", expected) in seen
    args64, kwargs64 = as_double(args, kwargs)
    assert_matches_reference(out, _reference.separable_conv2d(*args64, **kwargs64))


# ---- depthwise weight gradient: all taps in one pass, fixed splits ------------------------------------

DW_WEIGHT_GEOMETRY = [  # (n, c, h, w, k, stride, pad_beg, pad_end, dilation, channels_last)
    (3, 6, 11, 10, 3, 2, 2, 2, 2, True),  # splits end inside images
    (2, 9, 7, 13, 5, 1, 2, 2, 1, False),  # k = 5: channels 2 at a time, 9 is ragged
    (1, 3, 12, 12, 7, 2, 3, 3, 1, False),  # k = 7: 49 taps padded to 64
    (4, 5, 1, 1, 3, 1, 1, 1, 1, True),  # 1x1 image: one valid tap
]


@pytest.mark.parametrize("geom", DW_WEIGHT_GEOMETRY, ids=[str(g) for g in DW_WEIGHT_GEOMETRY])
def test_depthwise_weight_grad_splits(geom):
    from fastseg.triton_kernels import separable_conv2d as tk

    n, c, h, w, k, s, pb, pe, d, cl = geom
    torch.manual_seed(zlib.crc32(str(geom).encode()))
    x = torch.randn(n, c, h, w)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w64 = torch.randn(c, 1, k, k, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(F.pad(x.double(), (pb, pe, pb, pe)), w64, stride=s, dilation=d, groups=c)
    g = torch.randn(ref.shape, dtype=torch.float64)
    (gw64,) = torch.autograd.grad(ref, (w64,), g)
    g32 = g.float().contiguous()
    for split in (None, 1, 2, 5, 1000):  # 1000: more than there are pixel tiles
        gw = tk._launch_depthwise_bwd_weight(g32, x, k, s, pb, d, split=split)
        torch.testing.assert_close(gw.double(), gw64, atol=1e-4, rtol=1e-4)
        assert torch.equal(gw, tk._launch_depthwise_bwd_weight(g32, x, k, s, pb, d, split=split))


def test_depthwise_weight_split_covers_every_tile():
    from fastseg.triton_kernels import separable_conv2d as tk

    for n, c, p, k in [(1, 2048, 1089, 3), (16, 32, 66049, 3), (3, 7, 1, 5), (2, 728, 4225, 7)]:
        for split in (None, 1, 3, 64, 10 ** 6):
            cfg = tk._dw_weight_config(n, c, p, k, split)
            assert cfg["split"] * cfg["chunk"] >= cfg["tiles"] > (cfg["split"] - 1) * cfg["chunk"]
            assert cfg["BLOCK_C"] * cfg["KK"] * cfg["BLOCK_P"] <= 4096 or cfg["BLOCK_P"] == 16
            if split is None:
                assert -(-c // cfg["BLOCK_C"]) * cfg["split"] <= 2048
