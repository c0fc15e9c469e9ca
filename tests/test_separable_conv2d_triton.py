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
