"""fastseg.ops.separable_conv2d: every backend against the float64 reference."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from conftest import HAS_GPU, assert_matches_reference

from fastseg import ops
from fastseg.ops import _reference
from fastseg.ops._reference import fixed_padding


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
    affine: str = "all"  # which of dw/pw get an affine: none, dw, pw, all
    dw_relu: bool = True
    relu: bool = True
    layout: str = "contiguous"  # contiguous, channels_last, strided (x and the weights)

    @property
    def small(self) -> bool:
        return self.n * self.c * self.h * self.w <= 2000 and self.c * self.o <= 400

    def __str__(self) -> str:
        pad = "-".join(map(str, self.padding)) if isinstance(self.padding, tuple) else self.padding
        return (f"n{self.n}c{self.c}o{self.o}_{self.h}x{self.w}_k{self.k}s{self.stride}d{self.dilation}"
                f"p{pad}_{self.affine}{'_dr' * self.dw_relu}{'_r' * self.relu}_{self.layout}")


# Odd and prime sizes on purpose; C and O never multiples of 8.
CASES = [
    Case(1, 5, 7, 9, 11),
    Case(3, 17, 13, 13, 7, stride=2, dilation=2, affine="dw", dw_relu=False, layout="channels_last"),
    Case(2, 3, 2, 5, 5, k=5, dilation=6, affine="pw", relu=False, layout="strided"),
    Case(1, 7, 19, 9, 9, dilation=18),  # dilation larger than the image
    Case(1, 5, 3, 11, 13, stride=2, dilation=12, affine="none", dw_relu=False, relu=False),
    Case(3, 11, 5, 8, 15, k=5, stride=2, dilation=3, padding=2, layout="channels_last"),
    Case(2, 3, 5, 7, 6, stride=3, dilation=1, padding="valid", layout="strided"),
    Case(1, 3, 4, 6, 6, dilation=18, padding="valid"),  # kernel does not fit: empty output
    Case(0, 5, 7, 9, 11),  # empty batch
    Case(1, 1, 1, 1, 1, dilation=2),  # 1x1 image, single channels
    Case(3, 3, 7, 1, 1, dilation=2, affine="dw", relu=False),  # 1x1 image
    Case(2, 5, 2, 9, 5, stride=2, padding=(0, 2), affine="pw", dw_relu=False, layout="channels_last"),
    Case(1, 40, 130, 13, 13),  # several channel chunks and output-channel tiles of the GPU kernels
    Case(1, 257, 9, 37, 29, dilation=2, affine="all"),  # several CPU tiles per image, ragged last one
]
IDS = [str(c) for c in CASES]


def sample_inputs(case: Case, device: str | torch.device, dtype: torch.dtype, requires_grad: bool = False):
    """(args, kwargs) for ops.separable_conv2d: fresh random inputs, never zeros."""
    def make(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, device=device, dtype=torch.float64) * scale + shift
        return t.to(dtype)

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
        for t in args + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]:
            t.requires_grad_(True)
    return args, kwargs


def tensors_of(args, kwargs):
    return list(args) + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]


def as_double(args, kwargs):
    """The same inputs in float64, as fresh leaves (for the oracle)."""
    cast = {id(t): t.detach().double().requires_grad_(t.requires_grad) for t in tensors_of(args, kwargs)}
    return ([cast[id(t)] for t in args],
            {k: cast[id(v)] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def check_forward_backward(case: Case, backend: str, device: str, dtype: torch.dtype) -> None:
    torch.manual_seed(zlib.crc32(str(case).encode()))
    args, kwargs = sample_inputs(case, device, dtype, requires_grad=True)
    out = ops.separable_conv2d(*args, **kwargs, backend=backend)
    args64, kwargs64 = as_double(args, kwargs)
    ref64 = _reference.separable_conv2d(*args64, **kwargs64)
    ref_lp = _reference.separable_conv2d(*args, **kwargs) if dtype != torch.float64 else None
    assert out.dtype == dtype and out.device == args[0].device
    assert_matches_reference(out, ref64, ref_lp)
    if out.numel() == 0 and case.n == 0:
        return
    grad = torch.randn_like(ref64)
    leaves, leaves64 = tensors_of(args, kwargs), tensors_of(args64, kwargs64)
    got = torch.autograd.grad(out, leaves, grad.to(dtype), allow_unused=True)
    want = torch.autograd.grad(ref64, leaves64, grad, allow_unused=True)
    want_lp = (torch.autograd.grad(ref_lp, leaves, grad.to(dtype), allow_unused=True)
               if ref_lp is not None else [None] * len(leaves))
    names = ["x", "dw_weight", "pw_weight"] + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    for name, g, w, wl in zip(names, got, want, want_lp, strict=True):
        w = torch.zeros_like(leaves64[names.index(name)]) if w is None else w
        g = torch.zeros_like(w, dtype=dtype) if g is None else g
        assert_matches_reference(g, w, None if wl is None else wl, name=f"grad {name}")


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


SMALL = [c for c in CASES if c.small and c.n > 0]


@pytest.mark.parametrize("case", SMALL, ids=[str(c) for c in SMALL])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(backend, case):
    args, kwargs = sample_inputs(case, "cpu", torch.float64, requires_grad=True)
    names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    flags = {k: v for k, v in kwargs.items() if k not in names}

    def fn(x, dw, pw, *affine):
        return ops.separable_conv2d(x, dw, pw, **dict(zip(names, affine, strict=True)), **flags, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors_of(args, kwargs), eps=1e-6, atol=1e-7)


# The CPU op picks per shape between the fused tile kernel (BLAS GEMM on the depthwise tile) and
# the split path (depthwise intermediate, then the pointwise stage as a 1x1 convolution, oneDNN,
# with its backward); FASTSEG_SEPCONV_CPU_PATH forces either. Forced "split" runs float64 too
# (at::convolution's slow path), so gradcheck covers it.
PATH_CASES = [CASES[0], CASES[1], CASES[2], CASES[5], CASES[11], CASES[12], CASES[13],
              Case(2, 70, 67, 11, 9, dilation=2, layout="strided"), Case(1, 9, 11, 17, 13, k=5, stride=2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", PATH_CASES, ids=[str(c) for c in PATH_CASES])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_cpu_paths_match_reference(monkeypatch, path, case, dtype):
    monkeypatch.setenv("FASTSEG_SEPCONV_CPU_PATH", path)
    check_forward_backward(case, "cpu", "cpu", dtype)


@pytest.mark.parametrize("case", [c for c in PATH_CASES if c.small], ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_cpu_paths_gradcheck(monkeypatch, path, case):
    monkeypatch.setenv("FASTSEG_SEPCONV_CPU_PATH", path)
    test_gradcheck("cpu", case)


def test_cpu_paths_agree_on_a_deeplab_shape(monkeypatch):
    """An ASPP-like shape (many channels: the automatic choice picks split where oneDNN runs) in
    both paths and the automatic one: the same result, and the same gradients."""
    case = Case(1, 203, 131, 13, 11, dilation=6)
    results = {}
    for path in ("fused", "split", ""):
        monkeypatch.setenv("FASTSEG_SEPCONV_CPU_PATH", path)
        torch.manual_seed(0)
        args, kwargs = sample_inputs(case, "cpu", torch.float32, requires_grad=True)
        out = ops.separable_conv2d(*args, **kwargs, backend="cpu")
        results[path] = (out, *torch.autograd.grad(out.square().sum(), tensors_of(args, kwargs)))
    for path in ("split", ""):
        for got, want in zip(results[path], results["fused"], strict=True):
            torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_backward_op_with_relu_matches_autograd():
    """Autograd applies the final ReLU's mask itself and calls the backward op with relu=False;
    a direct call with relu=True recomputes the mask and must give the same gradients."""
    args, kwargs = sample_inputs(CASES[0], "cpu", torch.float64, requires_grad=True)
    out = ops.separable_conv2d(*args, **kwargs, backend="cpu")
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, tensors_of(args, kwargs), grad)
    pos = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in positional(args, kwargs))
    got = torch.ops.fastseg._separable_conv2d_backward(grad, *pos)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def positional(args, kwargs):
    """Arguments of torch.ops.fastseg.separable_conv2d (the schema's order)."""
    beg, end = fixed_padding(args[1].shape[-1], kwargs["dilation"], kwargs["padding"])
    return (*args, kwargs.get("dw_scale"), kwargs.get("dw_shift"), kwargs.get("pw_scale"),
            kwargs.get("pw_shift"), kwargs["stride"], beg, end, kwargs["dilation"],
            kwargs["dw_relu"], kwargs["relu"])


OPCHECK = [CASES[0], CASES[1], CASES[2], CASES[7], CASES[8]]


@pytest.mark.parametrize("case", OPCHECK, ids=[str(c) for c in OPCHECK])
def test_opcheck(case):
    args, kwargs = sample_inputs(case, "cpu", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.separable_conv2d.default, positional(args, kwargs))
    out_shape = ops.separable_conv2d(*args, **kwargs).shape
    bwd_args = (torch.randn(out_shape),) + tuple(
        a.detach() if isinstance(a, torch.Tensor) else a for a in positional(args, kwargs))
    torch.library.opcheck(torch.ops.fastseg._separable_conv2d_backward.default, bwd_args)


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK, ids=[str(c) for c in OPCHECK])
def test_opcheck_cuda(case):
    args, kwargs = sample_inputs(case, "cuda", torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.fastseg.separable_conv2d.default, positional(args, kwargs))


@pytest.mark.gpu
def test_autocast_cuda():
    args, kwargs = sample_inputs(CASES[0], "cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.separable_conv2d(*args, **kwargs, backend="cuda")
    assert out.dtype == torch.bfloat16
    ref = _reference.separable_conv2d(*as_double(args, kwargs)[0], **as_double(args, kwargs)[1])
    torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.05)


def _compile_check(device, backend):
    case = Case(2, 5, 7, 9, 11, dilation=2)
    args, kwargs = sample_inputs(case, device, torch.float32)

    def f(x, dw, pw, ds, dh, ps, ph):
        y = ops.separable_conv2d(x, dw, pw, dilation=2, dw_scale=ds, dw_shift=dh, dw_relu=True,
                                 pw_scale=ps, pw_shift=ph, relu=True, backend=backend)
        return y * 2 + 1

    inputs = tensors_of(args, kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), f(*inputs))


def test_compile_fullgraph_cpu():
    _compile_check("cpu", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_compile_fullgraph_gpu(backend):
    _compile_check("cuda", backend)


# ---- bad input -----------------------------------------------------------------------------------

def _good(**over):
    t = dict(x=torch.randn(1, 4, 6, 6), dw=torch.randn(4, 1, 3, 3), pw=torch.randn(5, 4, 1, 1))
    t.update(over)
    return t


BAD = [
    ("wrong rank", _good(x=torch.randn(4, 6, 6)), {}, "x must be 4-D"),
    ("channel mismatch dw", _good(dw=torch.randn(3, 1, 3, 3)), {}, "dw_weight"),
    ("channel mismatch pw", _good(pw=torch.randn(5, 3, 1, 1)), {}, "pw_weight"),
    ("non-square kernel", _good(dw=torch.randn(4, 1, 3, 5)), {}, "dw_weight"),
    ("dilation 0", _good(), {"dilation": 0}, "dilation"),
    ("stride 0", _good(), {"stride": 0}, "stride"),
    ("negative padding", _good(), {"padding": -1}, "padding"),
    ("unknown padding", _good(), {"padding": "full"}, "padding"),
    ("integer dtype", _good(x=torch.randint(0, 5, (1, 4, 6, 6))), {}, "x must be floating"),
    ("dtype mix", _good(pw=torch.randn(5, 4, 1, 1, dtype=torch.float64)), {}, "pw_weight dtype"),
    ("device mix", _good(dw=torch.randn(4, 1, 3, 3, device="meta")), {}, "dw_weight is on"),
    ("affine length", _good(), {"dw_scale": torch.randn(3)}, "dw_scale"),
    ("affine rank", _good(), {"pw_shift": torch.randn(5, 1)}, "pw_shift"),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name,tensors,kwargs,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, tensors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.separable_conv2d(tensors["x"], tensors["dw"], tensors["pw"], **kwargs, backend=backend)


@pytest.mark.parametrize("name,over,match", [
    ("channel mismatch", dict(dw=torch.randn(3, 1, 3, 3)), "dw_weight must be"),
    ("dilation 0", dict(dilation=0), "dilation must be"),
    ("integer dtype", dict(x=torch.randint(0, 5, (1, 4, 6, 6))), "x must be floating"),
    ("half on cpu", dict(x=torch.randn(1, 4, 6, 6).half(), dw=torch.randn(4, 1, 3, 3).half(),
                         pw=torch.randn(5, 4, 1, 1).half()), "cpu backend of separable_conv2d supports"),
])
def test_bad_input_reaches_cpp_checks(name, over, match):
    """Direct torch.ops callers skip the Python checks; the C++ kernel names the argument too."""
    t = _good(**{k: v for k, v in over.items() if k in ("x", "dw", "pw")})
    dil = over.get("dilation", 1)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastseg.separable_conv2d(t["x"], t["dw"], t["pw"], None, None, None, None, 1, 1, 1, dil,
                                           False, False)


def test_no_depthwise_intermediate_in_cpu_forward():
    """The fused CPU forward allocates nothing of the [N, C, Ho, Wo] intermediate's size."""
    x, dw, pw = torch.randn(1, 512, 193, 193), torch.randn(512, 1, 3, 3), torch.randn(8, 512, 1, 1)
    with torch.profiler.profile(profile_memory=True) as prof:
        ops.separable_conv2d(x, dw, pw, dilation=6, backend="cpu")
    allocs = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    intermediate = x.numel() * x.element_size()
    assert max(allocs) < intermediate / 4, f"an allocation of {max(allocs)} bytes (intermediate is {intermediate})"


@pytest.mark.skipif(HAS_GPU, reason="checks the error raised when no GPU is present")
def test_cuda_backend_without_gpu_says_why():
    args, kwargs = sample_inputs(CASES[0], "cpu", torch.float32)
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.separable_conv2d(*args, **kwargs, backend="cuda")


# ---- triton backend on a GPU: devices, fp32 dot precision, output-channel groups -------------------


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (inputs on cuda:1, cuda:0 current)")
def test_triton_on_non_default_device():
    """Triton launches on the current device: the op must switch to the inputs' device."""
    with torch.cuda.device(0):
        check_forward_backward(CASES[1], "triton", "cuda:1", torch.float32)
        check_forward_backward(CASES[0], "triton", "cuda:1", torch.bfloat16)


@pytest.mark.gpu
def test_triton_fp32_dot_follows_matmul_precision():
    """"highest" is exact fp32 (as the table needs); "medium" is TF32, so it differs from it."""
    case = Case(2, 40, 37, 9, 11, dilation=2)
    torch.manual_seed(0)
    args, kwargs = sample_inputs(case, "cuda", torch.float32)
    ref = _reference.separable_conv2d(*as_double(args, kwargs)[0], **as_double(args, kwargs)[1])
    old = torch.get_float32_matmul_precision()
    outs = {}
    try:
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            outs[precision] = ops.separable_conv2d(*args, **kwargs, backend="triton")
    finally:
        torch.set_float32_matmul_precision(old)
    assert_matches_reference(outs["highest"], ref)
    assert_matches_reference(outs["high"], ref)  # tf32x3: about fp32's accuracy
    torch.testing.assert_close(outs["medium"].double(), ref, atol=1e-2, rtol=1e-2)
    assert not torch.equal(outs["medium"], outs["highest"])


# O above one 256-channel group and not a multiple of it (k = 3 and 5, stride 2, dilation), and
# batch 1 at 17x17 with 2048 outputs (the launcher's fill rule: 16-pixel tiles, 8+ groups).
WIDE_GPU = [
    Case(2, 24, 300, 13, 11, stride=2, dilation=2),
    Case(1, 19, 600, 10, 9, k=5, dilation=3, affine="pw", layout="channels_last"),
    Case(1, 64, 2048, 17, 17),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WIDE_GPU, ids=[str(c) for c in WIDE_GPU])
def test_triton_wide_output_gpu(case, dtype):
    check_forward_backward(case, "triton", "cuda", dtype)
