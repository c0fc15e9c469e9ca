"""Triton backend of separable_conv2d under TRITON_INTERPRET=1 (CPU tensors, fp32), against the
float64 reference: forward, every gradient, the depthwise kernels on their own, determinism.

Run in its own process: ``TRITON_INTERPRET=1 pytest tests/test_separable_conv2d_triton.py``
(the interpreter must be on before triton is first imported, so setting it here is too late).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_matches_reference

from fastseg import ops
from fastseg.ops import _reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="Triton interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                              "(run this file in its own pytest process)"),
]


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    o: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    dilation: int = 1
    padding: str | int | tuple[int, int] = "same"
    affine: str = "all"  # none, dw, pw, all
    dw_relu: bool = True
    relu: bool = True
    layout: str = "contiguous"  # contiguous, channels_last, strided (x and the weights)

    def __str__(self) -> str:
        pad = self.padding if not isinstance(self.padding, tuple) else "-".join(map(str, self.padding))
        return (f"n{self.n}c{self.c}o{self.o}_{self.h}x{self.w}_k{self.k}s{self.stride}d{self.dilation}p{pad}"
                f"_{self.affine}{'_dr' if self.dw_relu else ''}{'_r' if self.relu else ''}_{self.layout}")


# Odd and prime sizes; every affine/ReLU combination appears; C > 32 and O > 128 give several
# channel chunks and output-channel tiles of the fused kernel, 13x13 several pixel tiles.
CASES = [
    Case(1, 5, 7, 9, 13),
    Case(3, 17, 19, 13, 7, k=5, stride=2, dilation=2, affine="dw", dw_relu=False, layout="channels_last"),
    Case(2, 3, 2, 5, 5, k=5, dilation=6, affine="pw", relu=False, layout="strided"),
    Case(1, 7, 19, 9, 9, dilation=18),  # dilation larger than the image
    Case(1, 5, 3, 13, 13, stride=2, dilation=6, affine="none", dw_relu=False, relu=False, layout="strided"),
    Case(3, 3, 7, 1, 1, dilation=2, affine="dw", relu=False),  # 1x1 image
    Case(2, 5, 2, 9, 5, k=3, stride=2, padding=(0, 2), affine="pw", dw_relu=False, layout="channels_last"),
    Case(1, 40, 130, 13, 13, dilation=1),  # 2 channel chunks, 2 output-channel tiles, 3 pixel tiles
    Case(1, 3, 2, 5, 5, dilation=18, padding="valid"),  # kernel does not fit: empty output
    Case(0, 5, 7, 9, 11),  # empty batch
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, requires_grad: bool = False):
    """(args, kwargs) for ops.separable_conv2d: fresh random fp32 CPU inputs, never zeros."""
    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale + shift).float()

    x = make(case.n, case.c, case.h, case.w)
    dw = make(case.c, 1, case.k, case.k, scale=0.5)
    pw = make(case.o, case.c, 1, 1, scale=case.c ** -0.5)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        pw = pw.contiguous(memory_format=torch.channels_last)
    elif case.layout == "strided":
        x = make(case.n, case.c, case.h, 2 * case.w + 1)[..., 1::2]
        dw = make(case.c, 1, case.k, 2 * case.k)[..., ::2]
        pw = make(case.c, case.o, 1, 1, scale=case.c ** -0.5).transpose(0, 1)
    kwargs = dict(stride=case.stride, padding=case.padding, dilation=case.dilation,
                  dw_relu=case.dw_relu, relu=case.relu)
    if case.affine in ("dw", "all"):
        kwargs.update(dw_scale=make(case.c, scale=0.3, shift=1.0), dw_shift=make(case.c, scale=0.1))
    if case.affine in ("pw", "all"):
        kwargs.update(pw_scale=make(case.o, scale=0.3, shift=1.0), pw_shift=make(case.o, scale=0.1))
    args = [x, dw, pw]
    if requires_grad:
        for t in tensors_of(args, kwargs):
            t.requires_grad_(True)
    return args, kwargs


def tensors_of(args, kwargs):
    return list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]


def names_of(kwargs):
    return ["x", "dw_weight", "pw_weight"] + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]


def as_double(args, kwargs):
    cast = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in tensors_of(args, kwargs)}
    return ([cast[id(t)] for t in args],
            {k: cast[id(v)] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def seed(case) -> None:
    torch.manual_seed(zlib.crc32(str(case).encode()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(case):
    seed(case)
    args, kwargs = sample_inputs(case, requires_grad=True)
    out = ops.separable_conv2d(*args, **kwargs, backend="triton")
    args64, kwargs64 = as_double(args, kwargs)
    ref64 = _reference.separable_conv2d(*args64, **kwargs64)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_matches_reference(out, ref64)

    grad = torch.randn_like(ref64)
    leaves, leaves64 = tensors_of(args, kwargs), tensors_of(args64, kwargs64)
    got = torch.autograd.grad(out, leaves, grad.float())
    # The reference's empty-output path leaves some inputs out of its graph: their grad is zero.
    want = torch.autograd.grad(ref64, leaves64, grad, allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for w, t in zip(want, leaves64, strict=True)]
    for name, g, w, leaf in zip(names_of(kwargs), got, want, leaves, strict=True):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, name
        assert_matches_reference(g, w, name=f"grad {name}")


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
    case = Case(1, 3, 2, 5, 5, affine="dw")
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
