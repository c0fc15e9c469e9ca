"""fastseg.ops.position_attention (DANet PAM): every backend against the float64 reference."""

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
    ck: int
    c: int
    h: int
    w: int
    std: float = 1.0  # std 3 gives energies in the hundreds: the softmax must stay stable
    epilogue: str = "none"  # none, gamma, residual, both

    @property
    def small(self) -> bool:
        return self.b * self.c * self.h * self.w <= 600 and self.h * self.w <= 64

    def __str__(self) -> str:
        return f"b{self.b}ck{self.ck}c{self.c}_{self.h}x{self.w}_std{self.std:g}_{self.epilogue}"


# N never a multiple of a tile; H or W = 1; Ck from 1 to 64; C up to 512 on small N.
CASES = [
    Case(2, 3, 5, 7, 9, epilogue="both"),
    Case(1, 1, 7, 5, 1),
    Case(3, 8, 13, 1, 11, epilogue="gamma"),
    Case(1, 64, 33, 19, 23, std=3.0, epilogue="residual"),
    Case(2, 17, 512, 5, 7, epilogue="both"),
    Case(1, 64, 70, 37, 41, std=3.0),  # N = 1517: several query and key blocks, ragged edges
    Case(1, 5, 3, 1, 1),  # N = 1
    Case(0, 8, 16, 9, 9, epilogue="both"),  # empty batch
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, device, dtype, requires_grad: bool = False):
    """(args, kwargs) for ops.position_attention: fresh random inputs, never zeros."""
    torch.manual_seed(zlib.crc32(str(case).encode()))

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float64) * scale).to(dtype)

    # Queries and keys at std/sqrt-ish scales keep energies ~std² * sqrt(Ck), as DANet's are.
    q = make(case.b, case.ck, case.h, case.w, scale=case.std)
    k = make(case.b, case.ck, case.h, case.w, scale=case.std)
    v = make(case.b, case.c, case.h, case.w)
    kwargs = {}
    if case.epilogue in ("gamma", "both"):
        kwargs["gamma"] = make(1, scale=0.5)
    if case.epilogue in ("residual", "both"):
        kwargs["residual"] = make(case.b, case.c, case.h, case.w)
    args = [q, k, v]
    if requires_grad:
        for t in args + list(kwargs.values()):
            t.requires_grad_(True)
    return args, kwargs


def check(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    args, kwargs = sample_inputs(case, device, dtype, requires_grad=True)
    names = list(kwargs)

    def call(fn):
        return lambda q, k, v, *extra: fn(q, k, v, **dict(zip(names, extra, strict=True)))

    run = call(lambda *a, **kw: ops.position_attention(*a, **kw, backend=backend))
    check_forward_backward(run, call(_reference.position_attention), args + list(kwargs.values()),
                           ["q", "k", "v", *names])


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


SMALL = [c for c in CASES if c.small and c.b > 0]


@pytest.mark.parametrize("case", SMALL, ids=[str(c) for c in SMALL])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend, case):
    args, kwargs = sample_inputs(case, "cpu", torch.float64, requires_grad=True)
    names = list(kwargs)

    def fn(q, k, v, *extra):
        return ops.position_attention(q, k, v, **dict(zip(names, extra, strict=True)), backend=backend)

    assert torch.autograd.gradcheck(fn, args + list(kwargs.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6], CASES[7]], ids=str)
def test_opcheck(case):
    args, _ = sample_inputs(case, "cpu", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.position_attention.default, tuple(args))
    out, lse = torch.ops.fastseg.position_attention(*[a.detach() for a in args])
    torch.library.opcheck(torch.ops.fastseg._position_attention_backward.default,
                          (torch.randn_like(out), *[a.detach() for a in args], out, lse))


def test_compile_fullgraph_cpu():
    args, kwargs = sample_inputs(CASES[0], "cpu", torch.float32)

    def f(q, k, v, gamma, residual):
        return ops.position_attention(q, k, v, gamma=gamma, residual=residual, backend="cpu").relu()

    torch._dynamo.reset()
    inputs = args + list(kwargs.values())
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*inputs), f(*inputs))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=str)
def test_sdpa_baseline_is_the_same_function(case):
    """The benchmarks' second baseline (PyTorch SDPA with scale=1) computes the reference's function."""
    args, kwargs = sample_inputs(case, "cpu", torch.float64)
    torch.testing.assert_close(_reference.position_attention_sdpa(*args, **kwargs),
                               _reference.position_attention(*args, **kwargs))


def test_cpu_never_builds_the_nxn_matrix():
    """Fused forward and backward at N = 4096: no allocation near N² floats (64 MB)."""
    q, k = torch.randn(1, 64, 64, 64, requires_grad=True), torch.randn(1, 64, 64, 64, requires_grad=True)
    v = torch.randn(1, 128, 64, 64, requires_grad=True)
    with torch.profiler.profile(profile_memory=True) as prof:
        ops.position_attention(q, k, v, backend="cpu").sum().backward()
    biggest = max(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    assert biggest < 64 * 64 * 64 * 64 * 4 / 8, f"an allocation of {biggest} bytes"



@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("shape", [(3, 4, 6, 1, 11), (2, 5, 9, 23, 29), (1, 3, 4, 1, 1)], ids=str)
def test_cpu_backward_thread_chunks(threads, shape):
    """The one-pass backward cuts its (image, key block) tasks into one chunk per thread, each with its
    own dQ partial over the images it touches (a chunk may straddle images, or hold part of one):
    every split gives the float64 reference's gradients, and a given thread count the same bits."""
    b, ck, c, h, w = shape
    torch.manual_seed(b * 100 + h)
    q, k = torch.randn(b, ck, h, w, dtype=torch.float64), torch.randn(b, ck, h, w, dtype=torch.float64)
    v, g = torch.randn(b, c, h, w, dtype=torch.float64), torch.randn(b, c, h, w, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    want = torch.autograd.grad(_reference.position_attention(*leaves), leaves, g)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [torch.autograd.grad(ops.position_attention(*leaves, backend="cpu"), leaves, g) for _ in range(2)]
    finally:
        torch.set_num_threads(saved)
    for name, got, again, ref in zip("qkv", *runs, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11, msg=f"grad {name}")
        assert torch.equal(got, again), f"grad {name} differs between two runs"

BAD = [
    ("q/k channel mismatch", dict(k=torch.randn(1, 3, 5, 6)), {}, "q and k must have the same shape"),
    ("spatial mismatch q/v", dict(v=torch.randn(1, 7, 5, 5)), {}, "spatial mismatch"),
    ("batch mismatch", dict(v=torch.randn(2, 7, 5, 6)), {}, "batch"),
    ("wrong rank", dict(q=torch.randn(4, 5, 6)), {}, "q must be 4-D"),
    ("integer dtype", dict(v=torch.ones(1, 7, 5, 6, dtype=torch.int32)), {}, "v must be floating"),
    ("dtype mix", dict(v=torch.randn(1, 7, 5, 6, dtype=torch.float64)), {}, "v dtype"),
    ("gamma of wrong shape", {}, {"gamma": torch.randn(2)}, "gamma must be a 1-element"),
    ("residual of wrong shape", {}, {"residual": torch.randn(1, 7, 5, 5)}, "residual must have"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,over,kwargs,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, over, kwargs, match):
    t = {"q": torch.randn(1, 4, 5, 6), "k": torch.randn(1, 4, 5, 6), "v": torch.randn(1, 7, 5, 6), **over}
    with pytest.raises(ValueError, match=match):
        ops.position_attention(t["q"], t["k"], t["v"], **kwargs, backend=backend)


def test_bad_input_reaches_cpp_checks():
    with pytest.raises(RuntimeError, match="spatial"):
        torch.ops.fastseg.position_attention(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 5, 6),
                                             torch.randn(1, 7, 6, 5))


# ---- Triton on a GPU: devices, key widths, layouts, fp32 precision, opcheck / compile -----------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices (inputs on cuda:1 while cuda:0 is current)")
def test_triton_gpu_on_a_device_that_is_not_current():
    """Triton launches on the current device and stream: the op must switch to its inputs' device."""
    with torch.cuda.device(0):
        check(CASES[4], "triton", "cuda:1", torch.float32)
        check(CASES[4], "triton", "cuda:1", torch.float16)
        assert torch.cuda.current_device() == 0


# Ck = 512: BLOCK_D once grew with Ck (~224 KB of shared memory in fp16, out of resources on sm_90);
# now 64-wide chunks, streamed. Ck = 130: a ragged last chunk. C = 2048: 32 dP chunks.
WIDE = [Case(1, 512, 512, 9, 7, std=0.5), Case(2, 512, 2048, 5, 3, std=0.5, epilogue="both"),
        Case(1, 130, 70, 11, 13, std=0.5)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WIDE, ids=str)
def test_triton_gpu_wide_key_width(case, dtype):
    check(case, "triton", "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "cropped"])
def test_triton_gpu_layouts(layout, dtype):
    case = Case(2, 64, 70, 13, 11, std=0.5)
    args, _ = sample_inputs(case, "cuda", dtype)
    leaves = [relayout(t, layout).requires_grad_(True) for t in args]
    check_forward_backward(lambda q, k, v: ops.position_attention(q, k, v, backend="triton"),
                           _reference.position_attention, leaves, ["q", "k", "v"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("high", 1e-4), ("medium", 2e-2)])
def test_triton_gpu_float32_matmul_precision(precision, tol):
    """fp32 dots follow torch.get_float32_matmul_precision(): 3xTF32 ("high") stays close to fp32, TF32
    ("medium") within its 10-bit mantissa. Errors relative to each tensor's largest magnitude."""
    args, _ = sample_inputs(Case(2, 64, 70, 9, 11, std=0.5), "cuda", torch.float32, requires_grad=True)
    args64 = [t.detach().double().requires_grad_(True) for t in args]
    ref = _reference.position_attention(*args64)
    grad = torch.randn_like(ref)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        out = ops.position_attention(*args, backend="triton")
        got = [out, *torch.autograd.grad(out, args, grad.float())]
    finally:
        torch.set_float32_matmul_precision(old)
    want = [ref, *torch.autograd.grad(ref, args64, grad)]
    for name, g, w in zip(["out", "grad q", "grad k", "grad v"], got, want, strict=True):
        err = (g.double() - w).abs().max().item()
        assert err <= tol * w.abs().max().item(), f"{name}: {err:.3g}"


@pytest.mark.gpu
def test_triton_gpu_opcheck_and_compile():
    args, _ = sample_inputs(CASES[0], "cuda", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.position_attention_triton.default, tuple(args))
    out, lse = torch.ops.fastseg.position_attention_triton(*[a.detach() for a in args])
    torch.library.opcheck(torch.ops.fastseg._position_attention_triton_backward.default,
                          (torch.randn_like(out), *[a.detach() for a in args], out, lse))

    def f(q, k, v):
        return ops.position_attention(q, k, v, backend="triton").relu()

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(*args), f(*args))
