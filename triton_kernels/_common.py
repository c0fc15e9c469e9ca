"""What the Triton ops share: dtypes, interpreter detection, block-size rounding, index helpers."""

import os

import torch
import triton
import triton.language as tl  # noqa: F401  (the interpreter needs tl in a jit function's globals)
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 the raw kernel is launched: wrap_triton cannot wrap an interpreted one."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def check_dtype(op: str, name: str, t: Tensor) -> None:
    """A clear error for dtypes the Triton kernels do not take."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the triton backend of {op} supports float32, float16 and bfloat16 {name}, got {t.dtype}")


@triton.jit
def hw_offsets(offs, W, s_h, s_w):
    """Element offsets of the flattened positions ``offs`` (n = h * W + w) in a tensor whose H and W
    strides are (s_h, s_w): any memory format, no copy."""
    return (offs // W) * s_h + (offs % W) * s_w
