"""Triton backend of fastseg::separable_conv2d.

Forward: one fused kernel, ``_separable_conv2d_fwd_kernel``. A program owns BLOCK_P output pixels
of one image and BLOCK_O output channels (up to 256, all of them for most layers); it walks
the input channels BLOCK_C at a time, builds the depthwise [BLOCK_C, BLOCK_P] block in registers
(``_depthwise_tile``), applies the depthwise affine (+ReLU) and feeds it to one ``tl.dot`` with the
[BLOCK_O, BLOCK_C] pointwise tile, accumulating in fp32. The [N, C, Ho, Wo] depthwise intermediate
is never written to memory.

The depthwise stage runs on CUDA cores (about five instructions per tap and element) and, next to
the tensor-core dot, is the costly part, so a program serves as many output channels as it can from
one depthwise block: its BLOCK_O rows are the output-channel tiles of a loop over O, held as one
accumulator (Triton keeps no variable number of accumulators). The accumulator is capped at 8192
fp32 (32 KB per CTA, two 64x64 tiles: 32 registers a thread at 8 warps), so BLOCK_O = 256 comes with
BLOCK_P = 32 and 128 with 64 (16 pixels at k > 3, where the k*k tap loads take the registers). Wider
O is cut into ceil(OC / BLOCK_O) groups that each recompute the depthwise block (3x at OC = 728, 8x
at 2048). The grid is 1-D with the output-channel group fastest: the programs that share a pixel
tile run together and read its depthwise input from L2. When the grid would not fill the GPU
(batch 1 at 33x33), the pixel tile shrinks to 16 first, then the groups to 64 channels (recomputing
is cheaper than idle SMs). The exact-fp32 dot runs on CUDA cores and outweighs the depthwise work:
it keeps to 128 x 32 tiles.

Backward (op ``fastseg::_separable_conv2d_triton_backward``): the composite of
csrc/ops/separable_conv2d.cpp. The depthwise stage is recomputed with ``_depthwise_fwd_kernel``,
the pointwise GEMMs are ``torch.matmul`` in fp32, and the depthwise input / weight gradients come
from ``_depthwise_bwd_input_kernel`` (a gather: no atomics) and ``_depthwise_bwd_weight_kernel``
(a program per BLOCK_C channels and fixed slice of the N*Ho*Wo pixels, all k*k taps in one pass
over the gradient, partial sums added in a fixed order: deterministic, no atomics).

Dtypes: float32, float16 and bfloat16 on CUDA (fp32 accumulation everywhere); float32 under
``TRITON_INTERPRET=1`` on CPU tensors. For float32, the forward's ``tl.dot`` follows
``torch.get_float32_matmul_precision()`` as PyTorch's matmuls (and so the backward's) do: the
default "highest" is exact fp32 ("ieee", as before), "high" is tf32x3, "medium" tf32.

Launches run on the input's device and its current stream, whatever device is current. Shape
integers are not specialised (one compile serves every size); the memory strides are, so that a
unit stride is known to the compiler.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import check_dtype, dot_precision, kernel, on_device, pow2

from fastseg.ops._autograd import register_separable_conv2d_autograd
from fastseg.ops._reference import conv_out_size

__all__ = ["separable_conv2d"]

# Shape integers (and the conv geometry, a few values each) are runtime values: specialising them
# (== 1, % 16) would compile a variant per layer shape for no gain, since the flattened pixel index
# hides contiguity from the compiler anyway. Memory strides stay specialised (stride 1 is known).
_GEOMETRY = ["stride", "pad_beg", "dilation"]

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _depthwise_tile(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw) in elements, any dtype
    w_ptr,  # [C, 1, K, K], strides (swc, -, swh, sww)
    n,  # image index (int64)
    offs_c,  # [BLOCK_C] channel indices (int64)
    mask_c,  # [BLOCK_C]
    offs_p,  # [BLOCK_P] flattened output pixel indices oh * Wo + ow (int32)
    mask_p,  # [BLOCK_P]
    H, W, Wo,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    stride, pad_beg, dilation,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Depthwise conv of channels ``offs_c`` of image ``n`` at output pixels ``offs_p``:
    a [BLOCK_C, BLOCK_P] fp32 block, zero where masked."""
    oh = offs_p // Wo
    ow = offs_p % Wo
    x_rows = x_ptr + n * sxn + offs_c[:, None] * sxc  # [BLOCK_C, 1]
    w_rows = w_ptr + offs_c * swc  # [BLOCK_C]
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for i in tl.static_range(K):
        ih = oh * stride - pad_beg + i * dilation
        mh = mask_p & (ih >= 0) & (ih < H)
        for j in tl.static_range(K):
            iw = ow * stride - pad_beg + j * dilation
            m = mh & (iw >= 0) & (iw < W)
            xv = tl.load(x_rows + (ih * sxh + iw * sxw)[None, :], mask=mask_c[:, None] & m[None, :], other=0.0)
            wv = tl.load(w_rows + (i * swh + j * sww), mask=mask_c, other=0.0)
            acc += wv.to(tl.float32)[:, None] * xv.to(tl.float32)
    return acc


@triton.jit(do_not_specialize=["C", "OC", "H", "W", "Wo", "P"] + _GEOMETRY)
def _separable_conv2d_fwd_kernel(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw): any memory format, no copy
    dw_ptr,  # [C, 1, K, K], strides (swc, -, swh, sww)
    pw_ptr,  # [OC, C] (the [OC, C, 1, 1] weight), strides (spo, spc); same dtype as x
    ds_ptr,  # [C] fp32 contiguous depthwise scale (unused unless HAS_DS)
    dh_ptr,  # [C] fp32 contiguous depthwise shift (unused unless HAS_DH)
    ps_ptr,  # [OC] fp32 contiguous pointwise scale (unused unless HAS_PS)
    ph_ptr,  # [OC] fp32 contiguous pointwise shift (unused unless HAS_PH)
    out_ptr,  # [N, OC, Ho, Wo] contiguous, strides (OC*Ho*Wo, Ho*Wo, Wo, 1); dtype of x
    C, OC, H, W, Wo, P,  # P = Ho * Wo
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    spo, spc,
    stride, pad_beg, dilation,
    K: tl.constexpr,
    HAS_DS: tl.constexpr, HAS_DH: tl.constexpr, DW_RELU: tl.constexpr,
    HAS_PS: tl.constexpr, HAS_PH: tl.constexpr, RELU: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision ("ieee" = exact fp32; ignored for fp16 / bf16)
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # 1-D grid over N * cdiv(P, BLOCK_P) * cdiv(OC, BLOCK_O), output-channel group fastest: the
    # programs that recompute the same depthwise block are adjacent and find its input in L2.
    pid = tl.program_id(0)
    groups = tl.cdiv(OC, BLOCK_O)
    tiles = tl.cdiv(P, BLOCK_P)
    pid_o = pid % groups
    pid_np = pid // groups
    n = (pid_np // tiles).to(tl.int64)
    offs_p = (pid_np % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OC

    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask_c = offs_c < C
        # Computed once per channel chunk, used by all BLOCK_O output channels.
        y = _depthwise_tile(x_ptr, dw_ptr, n, offs_c, mask_c, offs_p, mask_p, H, W, Wo,
                            sxn, sxc, sxh, sxw, swc, swh, sww, stride, pad_beg, dilation, K, BLOCK_C, BLOCK_P)
        if HAS_DS:
            y = y * tl.load(ds_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        if HAS_DH:
            y = y + tl.load(dh_ptr + offs_c, mask=mask_c, other=0.0)[:, None]
        if DW_RELU:
            y = tl.maximum(y, 0.0)
        # Padded channels meet zero columns of the pw tile: they add nothing.
        pw = tl.load(pw_ptr + offs_o[:, None] * spo + offs_c[None, :] * spc,
                     mask=mask_o[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(pw, y.to(pw.dtype), acc, input_precision=PRECISION)

    if HAS_PS:
        acc = acc * tl.load(ps_ptr + offs_o, mask=mask_o, other=0.0)[:, None]
    if HAS_PH:
        acc = acc + tl.load(ph_ptr + offs_o, mask=mask_o, other=0.0)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + n * OC * P + offs_o[:, None].to(tl.int64) * P + offs_p[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=["C", "H", "W", "Wo", "P"] + _GEOMETRY)
def _depthwise_fwd_kernel(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw), any float dtype
    w_ptr,  # [C, 1, K, K], strides (swc, -, swh, sww)
    out_ptr,  # [N, C, Ho, Wo] fp32 contiguous, strides (C*P, P, Wo, 1)
    C, H, W, Wo, P,
    sxn, sxc, sxh, sxw,
    swc, swh, sww,
    stride, pad_beg, dilation,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)  # over N * cdiv(P, BLOCK_P)
    pid_c = tl.program_id(1)  # over cdiv(C, BLOCK_C)
    tiles = tl.cdiv(P, BLOCK_P)
    n = (pid_p // tiles).to(tl.int64)
    offs_p = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = offs_c < C
    a = _depthwise_tile(x_ptr, w_ptr, n, offs_c, mask_c, offs_p, mask_p, H, W, Wo,
                        sxn, sxc, sxh, sxw, swc, swh, sww, stride, pad_beg, dilation, K, BLOCK_C, BLOCK_P)
    out_ptrs = out_ptr + (n * C + offs_c[:, None]) * P + offs_p[None, :]
    tl.store(out_ptrs, a, mask=mask_c[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=["C", "H", "W", "Ho", "Wo"] + _GEOMETRY)
def _depthwise_bwd_input_kernel(
    g_ptr,  # [N, C, Ho, Wo] fp32 contiguous grad of the depthwise output, strides (C*Ho*Wo, Ho*Wo, Wo, 1)
    w_ptr,  # [C, 1, K, K], strides (swc, -, swh, sww)
    gx_ptr,  # [N, C, H, W] fp32 contiguous grad of x, strides (C*H*W, H*W, W, 1)
    C, H, W, Ho, Wo,
    swc, swh, sww,
    stride, pad_beg, dilation,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Gather: input pixel (ih, iw) sums g[oh, ow] * w[i, j] over the taps (i, j) with
    oh * stride = ih + pad_beg - i * dilation (same for w) integral and in range."""
    pid_p = tl.program_id(0)  # over N * cdiv(H * W, BLOCK_P)
    pid_c = tl.program_id(1)  # over cdiv(C, BLOCK_C)
    HW = H * W
    Po = Ho * Wo
    tiles = tl.cdiv(HW, BLOCK_P)
    n = (pid_p // tiles).to(tl.int64)
    offs_p = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = offs_c < C
    ih = offs_p // W
    iw = offs_p % W
    g_rows = g_ptr + (n * C + offs_c[:, None]) * Po  # [BLOCK_C, 1]
    w_rows = w_ptr + offs_c * swc
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for i in tl.static_range(K):
        nh = ih + pad_beg - i * dilation
        nh_c = tl.maximum(nh, 0)  # keep the division on non-negative numbers
        oh = nh_c // stride
        mh = mask_p & (nh >= 0) & (nh_c - oh * stride == 0) & (oh < Ho)
        for j in tl.static_range(K):
            nw = iw + pad_beg - j * dilation
            nw_c = tl.maximum(nw, 0)
            ow = nw_c // stride
            m = mh & (nw >= 0) & (nw_c - ow * stride == 0) & (ow < Wo)
            gv = tl.load(g_rows + (oh * Wo + ow)[None, :], mask=mask_c[:, None] & m[None, :], other=0.0)
            wv = tl.load(w_rows + (i * swh + j * sww), mask=mask_c, other=0.0)
            acc += wv.to(tl.float32)[:, None] * gv
    gx_ptrs = gx_ptr + (n * C + offs_c[:, None]) * HW + offs_p[None, :]
    tl.store(gx_ptrs, acc, mask=mask_c[:, None] & mask_p[None, :])


@triton.jit(do_not_specialize=["C", "H", "W", "Wo", "P", "tiles", "chunk"] + _GEOMETRY)
def _depthwise_bwd_weight_kernel(
    g_ptr,  # [N, C, Ho, Wo] fp32 contiguous grad of the depthwise output, strides (C*P, P, Wo, 1)
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw), any float dtype
    part_ptr,  # [SPLIT, C, K*K] fp32 contiguous partial sums, strides (C*K*K, K*K, 1)
    C, H, W, Wo, P,
    tiles, chunk,  # tiles = N * cdiv(P, BLOCK_P) pixel tiles; split s reduces tiles [s*chunk, (s+1)*chunk)
    sxn, sxc, sxh, sxw,
    stride, pad_beg, dilation,
    K: tl.constexpr, KK: tl.constexpr,  # KK: K*K rounded up to a power of two
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad w[c, i, j] = sum over (n, oh, ow) of g[n, c, oh, ow] * x[n, c, oh*s - pb + i*d, ow*s - pb + j*d].

    A program per (BLOCK_C channels, split): each gradient tile is read once and meets all k*k taps
    (a [BLOCK_C, KK, BLOCK_P] accumulator, taps on the middle axis); reduced over pixels at the end,
    in a fixed order (deterministic). Pixel indices are int32, divided once per tile, not per tap."""
    pid_c = tl.program_id(0)  # over cdiv(C, BLOCK_C)
    pid_s = tl.program_id(1)  # over SPLIT
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = offs_c < C
    tap = tl.arange(0, KK)
    mask_t = tap < K * K
    di = (tap // K) * dilation - pad_beg  # [KK] row / column offset of each tap
    dj = (tap % K) * dilation - pad_beg
    per_image = tl.cdiv(P, BLOCK_P)
    acc = tl.zeros((BLOCK_C, KK, BLOCK_P), dtype=tl.float32)
    start = pid_s * chunk
    for t in range(start, tl.minimum(start + chunk, tiles)):
        n = t // per_image  # scalar
        p = (t - n * per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = p < P
        oh = p // Wo
        ow = p - oh * Wo
        ih = (oh * stride)[None, :] + di[:, None]  # [KK, BLOCK_P]
        iw = (ow * stride)[None, :] + dj[:, None]
        mx = mask_t[:, None] & mask_p[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n64 = n.to(tl.int64)
        gv = tl.load(g_ptr + ((n64 * C + offs_c) * P)[:, None] + p[None, :],
                     mask=mask_c[:, None] & mask_p[None, :], other=0.0)  # [BLOCK_C, BLOCK_P]
        xv = tl.load(x_ptr + (n64 * sxn + offs_c * sxc)[:, None, None] + (ih * sxh + iw * sxw)[None, :, :],
                     mask=mask_c[:, None, None] & mx[None, :, :], other=0.0)  # [BLOCK_C, KK, BLOCK_P]
        acc += gv[:, None, :] * xv.to(tl.float32)
    total = tl.sum(acc, axis=2)  # [BLOCK_C, KK]
    ptrs = part_ptr + (pid_s * C + offs_c)[:, None] * (K * K) + tap[None, :]
    tl.store(ptrs, total, mask=mask_c[:, None] & mask_t[None, :])


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------

def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fwd_config(N: int, OC: int, P: int, k: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Launch parameters of the fused forward (the choice is explained in the module docstring).

    tl.dot needs every dimension >= 16. Registers (ptxas -v for sm_90a, Triton 3.6, k = 3) are set
    by the k*k tap loads of the [BLOCK_C, BLOCK_P] depthwise block, which the compiler issues all at
    once, plus the accumulator: 2 depthwise elements a thread per tap at 8 warps and BLOCK_P = 32
    (256 x 32: 150-200 registers; 128 x 64: 210), so the pixel tile is <= 64 at k = 3 and 16 above
    (k = 5: 160-240). The accumulator is <= 8192 fp32 (32 KB, 32 registers a thread at 8 warps).
    The exact-fp32 dot ("ieee") runs on CUDA cores and needs its operands in registers: at most
    128 x 32 there (200 registers), and it dominates the depthwise work there anyway."""
    precision = dot_precision(dtype)
    ieee = precision == "ieee"
    BLOCK_O = pow2(OC, 16, 128 if ieee else 256)
    BLOCK_P = pow2(P, 16, min(16 if k > 3 else 32 if ieee else 64, (4096 if ieee else 8192) // BLOCK_O))
    # Fill the GPU: narrower pixel tiles first (no extra work), then more output-channel groups
    # (each recomputes the depthwise block, which costs less than idle SMs).
    sms = _sm_count(device)
    while N * triton.cdiv(P, BLOCK_P) * triton.cdiv(OC, BLOCK_O) < sms and (BLOCK_P > 16 or BLOCK_O > 64):
        if BLOCK_P > 16:
            BLOCK_P //= 2
        else:
            BLOCK_O //= 2
    small = k <= 3 and BLOCK_P == 16 and BLOCK_O <= 128  # 1-2 depthwise elements a thread at 4 warps
    return dict(BLOCK_O=BLOCK_O, BLOCK_C=16, BLOCK_P=BLOCK_P, PRECISION=precision,
                num_warps=4 if small else 8, num_stages=2)


def _launch_separable_conv2d_fwd(x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
                                 dw_scale: Tensor | None, dw_shift: Tensor | None,
                                 pw_scale: Tensor | None, pw_shift: Tensor | None,
                                 stride: int, pad_beg: int, pad_end: int, dilation: int,
                                 dw_relu: bool, relu: bool) -> Tensor:
    N, C, H, W = x.shape
    OC, k = pw_weight.shape[0], dw_weight.shape[-1]
    Ho = conv_out_size(H, pad_beg, pad_end, k, dilation, stride)
    Wo = conv_out_size(W, pad_beg, pad_end, k, dilation, stride)
    out = torch.empty((N, OC, Ho, Wo), device=x.device, dtype=x.dtype)
    P = Ho * Wo
    if out.numel() == 0:
        return out
    pw2 = pw_weight.reshape(OC, C)
    affine = [None if t is None else t.to(torch.float32).contiguous()
              for t in (dw_scale, dw_shift, pw_scale, pw_shift)]
    dummy = x  # stands in for an absent affine; never read (its HAS_* flag is False)
    cfg = _fwd_config(N, OC, P, k, x.dtype, x.device)
    grid = (N * triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(OC, cfg["BLOCK_O"]),)
    kernel(_separable_conv2d_fwd_kernel)[grid](
        x, dw_weight, pw2, *[dummy if t is None else t for t in affine], out,
        C, OC, H, W, Wo, P,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
        pw2.stride(0), pw2.stride(1),
        stride, pad_beg, dilation,
        K=k, HAS_DS=affine[0] is not None, HAS_DH=affine[1] is not None, DW_RELU=dw_relu,
        HAS_PS=affine[2] is not None, HAS_PH=affine[3] is not None, RELU=relu, **cfg,
    )
    return out


def _depthwise_blocks(C: int, P: int, k: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the gather-style depthwise kernels: all k*k tap loads of a tile are in
    flight at once, so the tile shrinks as k grows (1024 elements at k <= 3, 512 above; 4 warps)."""
    BLOCK_C = pow2(C, 1, 8)
    BLOCK_P = pow2(P, 16, (1024 if k <= 3 else 512) // BLOCK_C)
    return BLOCK_C, BLOCK_P


def _launch_depthwise_fwd(x: Tensor, w: Tensor, stride: int, pad_beg: int, pad_end: int,
                          dilation: int) -> Tensor:
    """[N, C, Ho, Wo] fp32 depthwise conv of x (any strides) with w [C, 1, k, k]."""
    N, C, H, W = x.shape
    k = w.shape[-1]
    Ho = conv_out_size(H, pad_beg, pad_end, k, dilation, stride)
    Wo = conv_out_size(W, pad_beg, pad_end, k, dilation, stride)
    out = torch.empty((N, C, Ho, Wo), device=x.device, dtype=torch.float32)
    P = Ho * Wo
    if out.numel() == 0:
        return out
    BLOCK_C, BLOCK_P = _depthwise_blocks(C, P, k)
    grid = (N * triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))
    kernel(_depthwise_fwd_kernel)[grid](
        x, w, out,
        C, H, W, Wo, P,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        w.stride(0), w.stride(2), w.stride(3),
        stride, pad_beg, dilation,
        K=k, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
    )
    return out


def _launch_depthwise_bwd_input(grad: Tensor, w: Tensor, H: int, W: int, stride: int,
                                pad_beg: int, dilation: int) -> Tensor:
    """[N, C, H, W] fp32 grad of the depthwise input; grad [N, C, Ho, Wo] fp32 contiguous."""
    N, C, Ho, Wo = grad.shape
    k = w.shape[-1]
    if N * C * H * W == 0 or grad.numel() == 0:
        return torch.zeros((N, C, H, W), device=grad.device, dtype=torch.float32)
    gx = torch.empty((N, C, H, W), device=grad.device, dtype=torch.float32)
    BLOCK_C, BLOCK_P = _depthwise_blocks(C, H * W, k)
    grid = (N * triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C))
    kernel(_depthwise_bwd_input_kernel)[grid](
        grad, w, gx,
        C, H, W, Ho, Wo,
        w.stride(0), w.stride(2), w.stride(3),
        stride, pad_beg, dilation,
        K=k, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
    )
    return gx


def _dw_weight_config(N: int, C: int, P: int, k: int, split: int | None) -> dict:
    """Blocks and split of the depthwise weight gradient. The [BLOCK_C, KK, BLOCK_P] accumulator
    and the x tile loaded into it are 4096 elements each: BLOCK_P = 64 pixels (256 contiguous bytes
    of a gradient row) for k <= 7, 4 channels at k = 3, 2 at k = 5; 8 warps (sm_90a: 112 registers
    at k = 3, two CTAs an SM; 4 warps would need 167). The split depends on the shape only, so
    the sums are the same on every GPU: up to 1024 programs, each reducing at least 8 pixel tiles."""
    KK = triton.next_power_of_2(k * k)
    BLOCK_C = pow2(C, 1, max(1, 4096 // (KK * 64)))
    BLOCK_P = pow2(P, 16, max(16, 4096 // (BLOCK_C * KK)))
    tiles = N * triton.cdiv(P, BLOCK_P)
    if split is None:
        split = min(triton.cdiv(tiles, 8), triton.cdiv(1024, triton.cdiv(C, BLOCK_C)))
    chunk = triton.cdiv(tiles, max(1, split))
    return dict(KK=KK, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, tiles=tiles, chunk=chunk, split=triton.cdiv(tiles, chunk),
                num_warps=8 if BLOCK_C * KK * BLOCK_P >= 4096 else 4)


def _launch_depthwise_bwd_weight(grad: Tensor, x: Tensor, k: int, stride: int, pad_beg: int,
                                 dilation: int, split: int | None = None) -> Tensor:
    """[C, 1, k, k] fp32 grad of the depthwise weight; grad [N, C, Ho, Wo] fp32 contiguous.

    The N*Ho*Wo reduction is cut into ``split`` fixed runs of pixel tiles (enough programs to fill a
    GPU), whose partial sums are added by torch in a fixed order: deterministic."""
    N, C, H, W = x.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    P = Ho * Wo
    if N * P == 0 or C == 0:
        return torch.zeros((C, 1, k, k), device=x.device, dtype=torch.float32)
    cfg = _dw_weight_config(N, C, P, k, split)
    part = torch.empty((cfg["split"], C, k * k), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), cfg["split"])
    kernel(_depthwise_bwd_weight_kernel)[grid](
        grad, x, part,
        C, H, W, Wo, P, cfg["tiles"], cfg["chunk"],
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        stride, pad_beg, dilation,
        K=k, KK=cfg["KK"], BLOCK_C=cfg["BLOCK_C"], BLOCK_P=cfg["BLOCK_P"], num_warps=cfg["num_warps"],
    )
    return part.sum(0).view(C, 1, k, k)


# ---- ops ---------------------------------------------------------------------------------------


@torch.library.triton_op("fastseg::separable_conv2d_triton", mutates_args=())
def _separable_conv2d_triton(
    x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
    dw_scale: Tensor | None, dw_shift: Tensor | None,
    pw_scale: Tensor | None, pw_shift: Tensor | None,
    stride: int, pad_beg: int, pad_end: int, dilation: int, dw_relu: bool, relu: bool,
) -> Tensor:
    check_dtype("separable_conv2d", "x", x)
    with on_device(x):
        return _launch_separable_conv2d_fwd(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                                            stride, pad_beg, pad_end, dilation, dw_relu, relu)


def _backward_fp32(grad_out, x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                   stride, pad_beg, pad_end, dilation, dw_relu, relu):
    """The backward composite in fp32 (defined before the op so that triton_op finds its kernels)."""
    N, C, H, W = x.shape
    OC, k = pw_weight.shape[0], dw_weight.shape[-1]
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    P = Ho * Wo
    f32 = torch.float32
    pw2 = pw_weight.reshape(OC, C).to(f32)
    gout = grad_out.to(f32).reshape(N, OC, P)

    def col(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(f32).view(1, -1, 1)

    ds, dh, ps, ph = col(dw_scale), col(dw_shift), col(pw_scale), col(pw_shift)

    # Recompute the forward: a (depthwise), b (affine), y (act), z (pointwise).
    a = _launch_depthwise_fwd(x, dw_weight, stride, pad_beg, pad_end, dilation).view(N, C, P)
    b = a
    if ds is not None:
        b = b * ds
    if dh is not None:
        b = b + dh
    y = b.clamp_min(0) if dw_relu else b
    z = torch.matmul(pw2, y)

    gu = gout
    if relu:
        u = z
        if ps is not None:
            u = u * ps
        if ph is not None:
            u = u + ph
        gu = gout * (u > 0)
    g_ps = (gu * z).sum((0, 2)) if ps is not None else None
    g_ph = gu.sum((0, 2)) if ph is not None else None
    gz = gu * ps if ps is not None else gu
    g_pw = torch.matmul(gz, y.transpose(1, 2)).sum(0).view(OC, C, 1, 1)
    gb = torch.matmul(pw2.t(), gz)
    if dw_relu:
        gb = gb * (b > 0)
    g_ds = (gb * a).sum((0, 2)) if ds is not None else None
    g_dh = gb.sum((0, 2)) if dh is not None else None
    ga = (gb * ds if ds is not None else gb).reshape(N, C, Ho, Wo).contiguous()
    g_x = _launch_depthwise_bwd_input(ga, dw_weight, H, W, stride, pad_beg, dilation)
    g_dw = _launch_depthwise_bwd_weight(ga, x, k, stride, pad_beg, dilation)

    def like(g: Tensor | None, p: Tensor | None) -> Tensor:
        return x.new_empty((0,)) if p is None else g.to(p.dtype)

    return (g_x.to(x.dtype), g_dw.to(dw_weight.dtype), g_pw.to(pw_weight.dtype),
            like(g_ds, dw_scale), like(g_dh, dw_shift), like(g_ps, pw_scale), like(g_ph, pw_shift))


@torch.library.triton_op("fastseg::_separable_conv2d_triton_backward", mutates_args=())
def _separable_conv2d_triton_backward(
    grad_out: Tensor, x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
    dw_scale: Tensor | None, dw_shift: Tensor | None,
    pw_scale: Tensor | None, pw_shift: Tensor | None,
    stride: int, pad_beg: int, pad_end: int, dilation: int, dw_relu: bool, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift); an absent
    affine gets an empty [0] tensor. Follows separable_conv2d_backward_impl (C++)."""
    check_dtype("separable_conv2d", "x", x)
    # fp32 throughout, even if the caller runs backward inside an autocast region.
    with on_device(x), torch.autocast(device_type=x.device.type, enabled=False):
        return _backward_fp32(grad_out, x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
                              stride, pad_beg, pad_end, dilation, dw_relu, relu)


register_separable_conv2d_autograd("fastseg::separable_conv2d_triton",
                                   torch.ops.fastseg._separable_conv2d_triton_backward)


def separable_conv2d(
    x: Tensor, dw_weight: Tensor, pw_weight: Tensor,
    dw_scale: Tensor | None, dw_shift: Tensor | None,
    pw_scale: Tensor | None, pw_shift: Tensor | None,
    stride: int, pad_beg: int, pad_end: int, dilation: int, dw_relu: bool, relu: bool,
) -> Tensor:
    """Fused separable conv on Triton: [N, C, H, W] -> [N, OC, Ho, Wo] (contiguous, dtype of x).

    Positional form of ``fastseg.ops.separable_conv2d`` (which checks the arguments): x any
    memory format; dw_weight [C, 1, k, k]; pw_weight [OC, C, 1, 1]; affines [C] / [OC] or None.
    Under CUDA autocast, x and the weights run in the autocast dtype (as the C++ op does).

    Example::

        >>> out = separable_conv2d(x, dw, pw, None, None, None, None, 1, 6, 6, 6, False, True)
    """
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        x, dw_weight, pw_weight = x.to(dt), dw_weight.to(dt), pw_weight.to(dt)
    return torch.ops.fastseg.separable_conv2d_triton(
        x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift,
        int(stride), int(pad_beg), int(pad_end), int(dilation), bool(dw_relu), bool(relu))
