"""fastseg.ops.esp_pyramid: every backend against the float64 reference."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from conftest import assert_matches_reference

from fastseg import ops
from fastseg.ops import _reference


@dataclass(frozen=True)
class Case:
    n: int
    c: int  # input channels (the reduced width d)
    d1: int  # output channels of branch 1
    d: int  # output channels of each other branch
    h: int
    w: int
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16)
    packed: bool = False  # weights as one [K, d, C, 3, 3] tensor (needs d1 == d)
    layout: str = "contiguous"  # contiguous, channels_last, strided (x)

    @property
    def k(self) -> int:
        return len(self.dilations)

    def __str__(self) -> str:
        dil = "-".join(map(str, self.dilations))
        return (f"n{self.n}c{self.c}d{self.d1}+{self.d}_{self.h}x{self.w}_dil{dil}"
                f"{'_packed' * self.packed}_{self.layout}")


# Odd and prime sizes on purpose: H or W below the largest dilation, widths not multiples of 5.
CASES = [
    Case(1, 7, 9, 7, 11, 13),
    Case(2, 3, 4, 3, 5, 19),  # H < 8 and 16: the wide branches see only padding rows
    Case(1, 5, 5, 5, 17, 3, packed=True, layout="channels_last"),  # W < 4
    Case(3, 2, 3, 2, 7, 7, dilations=(1, 3, 5), layout="strided"),
    Case(1, 4, 6, 1, 1, 1),  # 1x1 image: only centre taps
    Case(1, 6, 5, 5, 9, 11, dilations=(2,)),  # a single branch (no sums)
    Case(1, 11, 13, 11, 23, 37),  # several CPU tiles per image
    Case(0, 5, 6, 5, 9, 11),  # empty batch
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, device: str | torch.device, dtype: torch.dtype, requires_grad: bool = False):
    """(x, weights): fresh random inputs, never zeros; weights a list of K leaves or one packed leaf."""
    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float64) * scale).to(dtype)

    x = make(case.n, case.c, case.h, case.w)
    if case.layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif case.layout == "strided":
        x = make(case.n, case.c, case.h, 2 * case.w + 1)[..., 1::2]
    scale = (9 * case.c) ** -0.5
    if case.packed:
        weights = make(case.k, case.d, case.c, 3, 3, scale=scale)
    else:
        weights = [make(case.d1 if i == 0 else case.d, case.c, 3, 3, scale=scale) for i in range(case.k)]
    leaves = [x] + ([weights] if case.packed else weights)
    if requires_grad:
        for t in leaves:
            t.requires_grad_(True)
    return x, weights


def leaves_of(x, weights) -> list[torch.Tensor]:
    return [x] + ([weights] if isinstance(weights, torch.Tensor) else list(weights))


def as_double(x, weights):
    """The same inputs in float64, as fresh leaves (for the oracle)."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    if isinstance(weights, torch.Tensor):
        return x64, weights.detach().double().requires_grad_(weights.requires_grad)
    return x64, [w.detach().double().requires_grad_(w.requires_grad) for w in weights]


def check_forward_backward(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(zlib.crc32(str(case).encode()))
    x, weights = sample_inputs(case, device, dtype, requires_grad=True)
    out = ops.esp_pyramid(x, weights, dilations=case.dilations, backend=backend)
    x64, w64 = as_double(x, weights)
    ref64 = _reference.esp_pyramid(x64, w64, dilations=case.dilations)
    ref_lp = _reference.esp_pyramid(x, weights, dilations=case.dilations) if dtype != torch.float64 else None
    assert out.dtype == dtype and out.device == x.device
    assert out.shape == (case.n, case.d1 + (case.k - 1) * case.d, case.h, case.w)
    assert_matches_reference(out, ref64, ref_lp)
    if out.numel() == 0:
        return
    grad = torch.randn_like(ref64)
    leaves, leaves64 = leaves_of(x, weights), leaves_of(x64, w64)
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref64, leaves64, grad)
    want_lp = torch.autograd.grad(ref_lp, leaves, grad.to(dtype)) if ref_lp is not None else [None] * len(got)
    names = ["x"] + [f"weights[{i}]" for i in range(len(leaves) - 1)]
    for name, g, w, wl in zip(names, got, want, want_lp, strict=True):
        assert_matches_reference(g, w, wl, name=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cpu_matches_reference(backend, case, dtype):
    check_forward_backward(case, backend, "cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference(backend, case, dtype):
    check_forward_backward(case, backend, "cuda", dtype)


def test_espnet_layout_first_branch_wider():
    """ESPNet's own split: n_out = 64 -> d = 12, the first branch takes 64 - 4 * 12 = 16."""
    case = Case(1, 12, 16, 12, 13, 21)
    check_forward_backward(case, "cpu", "cpu", torch.float32)


SMALL = [c for c in CASES if c.n > 0 and c.n * c.c * c.h * c.w <= 600]


# gradcheck and opcheck call the op thousands of times on tiny inputs: one thread, or the two threads
# of this shared machine spin-wait on each other.
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", SMALL, ids=[str(c) for c in SMALL])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend, case):
    x, weights = sample_inputs(case, "cpu", torch.float64, requires_grad=True)
    packed = isinstance(weights, torch.Tensor)

    def fn(x, *ws):
        return ops.esp_pyramid(x, ws[0] if packed else list(ws), dilations=case.dilations, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves_of(x, weights), eps=1e-6, atol=1e-7)


def positional(x, weights, dilations):
    """Arguments of torch.ops.fastseg.esp_pyramid (the schema's order)."""
    weight = weights.flatten(0, 1) if isinstance(weights, torch.Tensor) else torch.cat(list(weights))
    first = weights.shape[1] if isinstance(weights, torch.Tensor) else weights[0].shape[0]
    return x, weight.detach().requires_grad_(True), first, list(dilations)


OPCHECK = [CASES[0], CASES[2], CASES[3], CASES[5], CASES[7]]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", OPCHECK, ids=[str(c) for c in OPCHECK])
def test_opcheck(case):
    x, weights = sample_inputs(case, "cpu", torch.float32, requires_grad=True)
    args = positional(x, weights, case.dilations)
    torch.library.opcheck(torch.ops.fastseg.esp_pyramid.default, args)
    out = torch.ops.fastseg.esp_pyramid(*args)
    bwd = (torch.randn_like(out), x.detach(), args[1].detach(), args[2], args[3])
    torch.library.opcheck(torch.ops.fastseg._esp_pyramid_backward.default, bwd)


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK, ids=[str(c) for c in OPCHECK])
def test_opcheck_cuda(case):
    x, weights = sample_inputs(case, "cuda", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.esp_pyramid.default, positional(x, weights, case.dilations))


@pytest.mark.gpu
def test_autocast_cuda():
    x, weights = sample_inputs(CASES[0], "cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.esp_pyramid(x, weights, backend="cuda")
    assert out.dtype == torch.bfloat16
    ref = _reference.esp_pyramid(*as_double(x, weights))
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.05)


def _compile_check(device, backend):
    case = Case(2, 5, 6, 5, 9, 11)
    x, weights = sample_inputs(case, device, torch.float32)

    def f(x, w0, w1, w2, w3, w4):
        return ops.esp_pyramid(x, [w0, w1, w2, w3, w4], dilations=(1, 2, 4, 8, 16), backend=backend) * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, *weights), f(x, *weights))


def test_compile_fullgraph_cpu():
    _compile_check("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph_gpu(backend):
    _compile_check("cuda", backend)


# ---- bad input -----------------------------------------------------------------------------------

def _w(*rows, c=4):
    return [torch.randn(r, c, 3, 3) for r in rows]


X = torch.randn(1, 4, 6, 6)
BAD = [
    ("wrong rank", torch.randn(4, 6, 6), _w(3, 2, 2, 2, 2), {}, "x must be 4-D"),
    ("integer x", torch.randint(0, 5, (1, 4, 6, 6)), _w(3, 2, 2, 2, 2), {}, "x must be floating"),
    ("channel mismatch", X, _w(3, 2, 2, 2, 2, c=3), {}, r"weights\[0\]"),
    ("kernel not 3x3", X, [torch.randn(3, 4, 5, 5)] + _w(2, 2, 2, 2), {}, r"weights\[0\]"),
    ("unequal later branches", X, _w(3, 2, 2, 3, 2), {}, "same number of output channels"),
    ("too few dilations", X, _w(3, 2, 2, 2, 2), {"dilations": (1, 2, 4, 8)}, "len\\(dilations\\)"),
    ("too many dilations", X, _w(3, 2), {"dilations": (1, 2, 4)}, "len\\(dilations\\)"),
    ("dilation 0", X, _w(3, 2, 2), {"dilations": (1, 0, 4)}, "dilations"),
    ("dilation float", X, _w(3, 2, 2), {"dilations": (1, 2.0, 4)}, "dilations"),
    ("empty weights", X, [], {}, "weights"),
    ("packed wrong rank", X, torch.randn(5, 2, 4, 3), {}, "weights as one tensor"),
    ("dtype mix", X, _w(3, 2, 2, 2) + [torch.randn(2, 4, 3, 3, dtype=torch.float64)], {}, r"weights\[4\] dtype"),
    ("device mix", X, _w(3, 2, 2, 2) + [torch.randn(2, 4, 3, 3, device="meta")], {}, r"weights\[4\] is on"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,x,weights,kwargs,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, x, weights, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.esp_pyramid(x, weights, **kwargs, backend=backend)


@pytest.mark.parametrize("weight,first,dilations,match", [
    (torch.randn(11, 4, 3, 3), 4, [1, 2, 4], "does not split"),
    (torch.randn(11, 4, 3, 3), 0, [1, 2], "first_channels"),
    (torch.randn(11, 4, 3, 3), 3, [], "dilations"),
    (torch.randn(11, 4, 3, 3), 3, [1, -2], "dilations"),
    (torch.randn(11, 3, 3, 3), 3, [1, 2], "weight must be"),
])
def test_bad_input_compiled_op(weight, first, dilations, match):
    """The C++ op checks its arguments too, for callers of torch.ops.fastseg directly."""
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastseg.esp_pyramid(X, weight, first, dilations)
