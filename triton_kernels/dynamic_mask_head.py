"""Triton backend of SOLOv2's dynamic mask head, ``fastseg::dynamic_mask_head`` semantics.

A program computes a BLOCK_N x (64·WORDS) tile of the logits kernels [n, E] · features [E, H·W] with
``tl.dot`` (float32 accumulation; fp32 operands follow ``torch.get_float32_matmul_precision()`` as
PyTorch's matmuls do: exact "ieee" by default) and consumes it in registers: a pixel is in the mask iff
its logit > logit(mask_thr) (strictly, csrc/ops/common/dynamic_mask_head.h; the float32 threshold is
logit(mask_thr) rounded toward -inf, so the comparison is exact), the 0/1 tile is packed into int64
words (bit b of word w is pixel 64 w + b; a sum of distinct powers of two per word), and the pixel
count and the sum of sigmoid over the mask are written per (row, pixel block). The n x H·W logits are
never stored; the partials are reduced in a fixed order by the launcher.

Works on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import check_dtype, dot_precision, kernel as _kernel, on_device

__all__ = ["dynamic_mask_head", "logit_threshold_f32"]


@triton.jit
def _dynamic_mask_head_kernel(
    k_ptr,  # [n, E] contiguous, strides (E, 1)
    f_ptr,  # [E, HW] contiguous, strides (HW, 1)
    masks_ptr,  # [n, words] int64 contiguous: the packed masks
    count_ptr,  # [n, P] int32 contiguous: pixels of row r's mask in pixel block p
    sum_ptr,  # [n, P] float32 contiguous: sum of sigmoid over those pixels
    thr,  # float32 logit threshold
    n, E, HW, words, P,
    BLOCK_N: tl.constexpr,  # candidates per program
    WORDS: tl.constexpr,  # words (64 pixels each) per program
    BLOCK_E: tl.constexpr,  # reduction step
    PRECISION: tl.constexpr,  # tl.dot input_precision
):
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = pid_p * (WORDS * 64) + tl.arange(0, WORDS * 64)
    mask_n = offs_n < n
    mask_p = offs_p < HW
    acc = tl.zeros((BLOCK_N, WORDS * 64), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        a = tl.load(k_ptr + offs_n[:, None].to(tl.int64) * E + offs_e[None, :],
                    mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        b = tl.load(f_ptr + offs_e[:, None].to(tl.int64) * HW + offs_p[None, :],
                    mask=mask_e[:, None] & mask_p[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    inside = (acc > thr) & mask_n[:, None] & mask_p[None, :]
    # Pack: the bits of a word are distinct powers of two, so their sum is their OR.
    bits = tl.reshape(inside.to(tl.int64), (BLOCK_N, WORDS, 64))
    shifts = tl.arange(0, 64).to(tl.int64)
    packed = tl.sum(bits << shifts[None, None, :], axis=2)
    offs_w = pid_p * WORDS + tl.arange(0, WORDS)
    tl.store(masks_ptr + offs_n[:, None].to(tl.int64) * words + offs_w[None, :], packed,
             mask=mask_n[:, None] & (offs_w < words)[None, :])
    count = tl.sum(inside.to(tl.int32), axis=1)
    total = tl.sum(tl.where(inside, tl.sigmoid(acc), 0.0), axis=1)
    tl.store(count_ptr + offs_n.to(tl.int64) * P + pid_p, count, mask=mask_n)
    tl.store(sum_ptr + offs_n.to(tl.int64) * P + pid_p, total, mask=mask_n)


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def logit_threshold_f32(mask_thr: float) -> float:
    """The float32 t with (x > t) <=> (x > logit(mask_thr)) for every float32 x: logit rounded toward
    -inf (-inf for mask_thr <= 0, +inf for mask_thr >= 1), as the C++ kernels compute it."""
    if not mask_thr > 0:
        return -math.inf
    if mask_thr >= 1:
        return math.inf
    lt = math.log(mask_thr) - math.log1p(-mask_thr)
    t = struct.unpack("<f", struct.pack("<f", lt))[0]
    if t > lt:  # one float32 step down
        b = _f32_bits(t)
        b = b - 1 if t > 0 else (b + 1 if t < 0 else 0x80000001)
        t = struct.unpack("<f", struct.pack("<I", b))[0]
    return t


def _blocks(n: int, e: int) -> dict[str, int]:
    """BLOCK_N candidates x 128 pixels (2 words) per program, E in steps of 32 (tl.dot needs >= 16)."""
    return dict(BLOCK_N=64 if n > 32 else 32, WORDS=2, BLOCK_E=32, num_warps=4)


@torch.library.triton_op("fastseg::dynamic_mask_head_triton", mutates_args=())
def _dynamic_mask_head_triton(kernels: Tensor, features: Tensor, mask_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    check_dtype("dynamic_mask_head", "kernels", kernels)
    if kernels.dim() != 2 or features.dim() != 3 or features.shape[0] != kernels.shape[1]:
        raise ValueError(f"kernels must be [n, E] and features [E, H, W], got {tuple(kernels.shape)} and "
                         f"{tuple(features.shape)}")
    if features.dtype != kernels.dtype or features.device != kernels.device:
        raise ValueError("features and kernels must have the same dtype and device")
    n, e = kernels.shape
    hw = features.shape[1] * features.shape[2]
    words = (hw + 63) // 64
    dev = kernels.device
    masks = torch.empty((n, words), device=dev, dtype=torch.int64)
    if n == 0 or hw == 0:
        return masks, torch.zeros((n,), device=dev, dtype=torch.float32), torch.zeros((n,), device=dev,
                                                                                     dtype=kernels.dtype)
    bs = _blocks(n, e)
    p = triton.cdiv(words, bs["WORDS"])
    counts = torch.empty((n, p), device=dev, dtype=torch.int32)
    sums = torch.empty((n, p), device=dev, dtype=torch.float32)
    with on_device(kernels):
        _kernel(_dynamic_mask_head_kernel)[(triton.cdiv(n, bs["BLOCK_N"]), p)](
            kernels.contiguous(), features.reshape(e, hw).contiguous(), masks, counts, sums,
            logit_threshold_f32(mask_thr), n, e, hw, words, p, BLOCK_N=bs["BLOCK_N"], WORDS=bs["WORDS"],
            BLOCK_E=bs["BLOCK_E"], PRECISION=dot_precision(kernels.dtype), num_warps=bs["num_warps"])
    count = counts.sum(1)
    areas = count.to(torch.float32)
    maskness = torch.where(count > 0, sums.sum(1) / areas.clamp(min=1), torch.zeros_like(areas))
    return masks, areas, maskness.to(kernels.dtype)


def dynamic_mask_head(kernels: Tensor, features: Tensor, mask_thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """The Triton backend of ``fastseg.ops.dynamic_mask_head`` (inference only, not differentiable).

    Args:
        kernels: [n, E] float32, float16 or bfloat16.
        features: [E, H, W], same dtype and device.
        mask_thr: probability threshold (a pixel is in iff sigmoid(logit) > mask_thr, strictly).

    Returns:
        (masks int64 [n, ceil(H·W/64)] bit-packed, areas float32 [n], maskness [n] in the inputs' dtype).

    Example::

        >>> masks, areas, maskness = dynamic_mask_head(kernels, features, 0.5)  # [500, 256], [256, 200, 304]
    """
    return torch.ops.fastseg.dynamic_mask_head_triton(kernels, features, float(mask_thr))
