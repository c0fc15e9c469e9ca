"""What the Triton ops share: dtypes, interpreter detection, launching, dot precision, block-size
rounding, index helpers."""

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 the raw kernel is launched: wrap_triton cannot wrap an interpreted one."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(fn):
    """The launchable form of a ``@triton.jit`` kernel: ``wrap_triton`` (visible to torch.compile),
    or the raw kernel under the interpreter, which wrap_triton cannot wrap."""
    return fn if interpreting() else wrap_triton(fn)


def on_device(t: Tensor):
    """Context in which to launch kernels on ``t``: Triton launches on the *current* CUDA device and
    its current stream, so inputs on cuda:1 while cuda:0 is current would be read from the wrong
    device. A no-op for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot`` for operands of ``dtype``: for float32 it follows
    ``torch.get_float32_matmul_precision()`` as PyTorch's own matmuls do ("highest" -> exact fp32
    "ieee", "high" -> "tf32x3", "medium" -> "tf32"); other dtypes ignore it."""
    if dtype != torch.float32:
        return "tf32"
    return _FP32_PRECISION[torch.get_float32_matmul_precision()]


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def check_dtype(op: str, name: str, t: Tensor) -> None:
    """A clear error for dtypes the Triton kernels do not take."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend of {op} supports float32, float16 and bfloat16 {name}, got {t.dtype}")


def hw_flat(t: Tensor) -> bool:
    """hw_offsets' FLAT path: H and W of t [B, C, H, W] collapse into one axis of stride t.stride(3)."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


@triton.jit
def hw_offsets(offs, W, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets of the flattened positions ``offs`` (n = h * W + w) in a tensor whose H and W
    strides are (s_h, s_w): any memory format, no copy.

    FLAT: the launcher found that H and W collapse into one axis (s_h == W * s_w, or H == 1), as in
    NCHW-contiguous and channels_last tensors: the offset is offs * s_w. Without the // and % by a
    runtime W, unit-stride rows (s_w == 1, specialised by the JIT) load as vectors whatever W is
    (DANet's maps are 65, 97, 129 wide); the general path's contiguity is provable only for a W
    specialised as a multiple of 16."""
    if FLAT:
        return offs * s_w
    else:
        return (offs // W) * s_h + (offs % W) * s_w
