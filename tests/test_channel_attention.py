"""fastseg.ops.channel_attention (DANet CAM): every backend against the float64 reference."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from conftest import check_forward_backward, relayout

from fastseg import ops
from fastseg.ops import _reference


@dataclass(frozen=True)
class Case:
    b: int
    c: int
    h: int
    w: int
    std: float = 1.0
    epilogue: str = "none"  # none, gamma, residual, both

    def __str__(self) -> str:
        return f"b{self.b}c{self.c}_{self.h}x{self.w}_std{self.std:g}_{self.epilogue}"


CASES = [
    Case(2, 5, 7, 9, epilogue="both"),
    Case(1, 1, 5, 1),
    Case(3, 13, 1, 11, epilogue="gamma"),
    Case(1, 64, 19, 23, std=3.0, epilogue="residual"),  # energies in the thousands
    Case(2, 131, 9, 7, epilogue="both"),
    Case(1, 512, 5, 3),
    Case(0, 8, 9, 9, epilogue="both"),
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, device, dtype, requires_grad: bool = False):
    torch.manual_seed(zlib.crc32(str(case).encode()))

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float64) * scale).to(dtype)

    x = make(case.b, case.c, case.h, case.w, scale=case.std)
    kwargs = {}
    if case.epilogue in ("gamma", "both"):
        kwargs["gamma"] = make(1, scale=0.5)
    if case.epilogue in ("residual", "both"):
        kwargs["residual"] = make(case.b, case.c, case.h, case.w)
    if requires_grad:
        for t in [x, *kwargs.values()]:
            t.requires_grad_(True)
    return [x], kwargs


def check(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    args, kwargs = sample_inputs(case, device, dtype, requires_grad=True)
    names = list(kwargs)

    def call(fn):
        return lambda x, *extra: fn(x, **dict(zip(names, extra, strict=True)))

    run = call(lambda *a, **kw: ops.channel_attention(*a, **kw, backend=backend))
    check_forward_backward(run, call(_reference.channel_attention), args + list(kwargs.values()), ["x", *names])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_matches_reference(backend, case, dtype):
    check(case, backend, "cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_gpu_matches_reference(case, dtype):
    check(case, "triton", "cuda", dtype)


SMALL = [c for c in CASES if c.b > 0 and c.b * c.c * c.h * c.w <= 700]


@pytest.mark.parametrize("case", SMALL, ids=[str(c) for c in SMALL])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend, case):
    args, kwargs = sample_inputs(case, "cpu", torch.float64, requires_grad=True)
    names = list(kwargs)

    def fn(x, *extra):
        return ops.channel_attention(x, **dict(zip(names, extra, strict=True)), backend=backend)

    assert torch.autograd.gradcheck(fn, args + list(kwargs.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[6]], ids=str)
def test_opcheck(case):
    args, _ = sample_inputs(case, "cpu", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.channel_attention.default, tuple(args))
    x = args[0].detach()
    torch.library.opcheck(torch.ops.fastseg._channel_attention_backward.default, (torch.randn_like(x), x))


def test_compile_fullgraph_cpu():
    args, kwargs = sample_inputs(CASES[0], "cpu", torch.float32)

    def f(x, gamma, residual):
        return ops.channel_attention(x, gamma=gamma, residual=residual, backend="cpu") * 2

    torch._dynamo.reset()
    inputs = args + list(kwargs.values())
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*inputs), f(*inputs))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,x,kwargs,match", [
    ("wrong rank", torch.randn(4, 5, 6), {}, "x must be 4-D"),
    ("integer dtype", torch.ones(1, 4, 5, 6, dtype=torch.int64), {}, "x must be floating"),
    ("gamma of wrong shape", torch.randn(1, 4, 5, 6), {"gamma": torch.randn(1, 2)}, "gamma must be a 1-element"),
    ("residual of wrong shape", torch.randn(1, 4, 5, 6), {"residual": torch.randn(1, 4, 6, 5)}, "residual must"),
])
def test_bad_input(backend, name, x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.channel_attention(x, **kwargs, backend=backend)


# ---- Triton on a GPU: devices, split Grams, layouts, fp32 precision, opcheck / compile -----------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (inputs on cuda:1 while cuda:0 is current)")
def test_triton_gpu_on_a_device_that_is_not_current():
    """Triton launches on the current device and stream: the op must switch to its input's device."""
    with torch.cuda.device(0):
        check(CASES[4], "triton", "cuda:1", torch.float32)
        check(CASES[4], "triton", "cuda:1", torch.float16)
        assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [Case(1, 512, 64, 64, std=0.1), Case(1, 2048, 9, 7, std=0.1)], ids=str)
def test_triton_gpu_danet_sizes(case, dtype):
    """DANet's C = 512 at N = 64 x 64 (the Gram split over N into partial Grams) and C = 2048."""
    check(case, "triton", "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "cropped"])
def test_triton_gpu_layouts(layout, dtype):
    (x,), _ = sample_inputs(Case(2, 70, 13, 11), "cuda", dtype)
    check_forward_backward(lambda x: ops.channel_attention(x, backend="triton"), _reference.channel_attention,
                           [relayout(x, layout).requires_grad_(True)], ["x"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("high", 1e-4), ("medium", 2e-2)])
def test_triton_gpu_float32_matmul_precision(precision, tol):
    """fp32 dots follow torch.get_float32_matmul_precision(): 3xTF32 ("high") stays close to fp32, TF32
    ("medium") within its 10-bit mantissa. Errors relative to each tensor's largest magnitude."""
    (x,), _ = sample_inputs(Case(2, 70, 9, 11, std=0.3), "cuda", torch.float32, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    ref = _reference.channel_attention(x64)
    grad = torch.randn_like(ref)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        out = ops.channel_attention(x, backend="triton")
        got = [out, *torch.autograd.grad(out, (x,), grad.float())]
    finally:
        torch.set_float32_matmul_precision(old)
    want = [ref, *torch.autograd.grad(ref, (x64,), grad)]
    for name, g, w in zip(["out", "grad x"], got, want, strict=True):
        err = (g.double() - w).abs().max().item()
        assert err <= tol * w.abs().max().item(), f"{name}: {err:.3g}"


@pytest.mark.gpu
def test_triton_gpu_opcheck_and_compile():
    (x,), _ = sample_inputs(CASES[4], "cuda", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.channel_attention_triton.default, (x,))
    torch.library.opcheck(torch.ops.fastseg._channel_attention_triton_backward.default,
                          (torch.randn_like(x), x.detach()))

    def f(x):
        return ops.channel_attention(x, backend="triton") * 2

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
