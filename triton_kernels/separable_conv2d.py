"""Triton backend of fastseg::separable_conv2d.

Forward: one fused kernel, ``_separable_conv2d_fwd_kernel``. A program owns BLOCK_P output pixels
of one image and BLOCK_O output channels; it walks the input channels BLOCK_C at a time, builds the
depthwise [BLOCK_C, BLOCK_P] block in registers (``_depthwise_tile``), applies the depthwise affine
(+ReLU) and feeds it to ``tl.dot`` with the [BLOCK_O, BLOCK_C] pointwise tile, accumulating in fp32.
The [N, C, Ho, Wo] depthwise intermediate is never written to memory.

Backward (op ``fastseg::_separable_conv2d_triton_backward``): the composite of
csrc/ops/separable_conv2d.cpp. The depthwise stage is recomputed with ``_depthwise_fwd_kernel``,
the pointwise GEMMs are ``torch.matmul`` in fp32, and the depthwise input / weight gradients come
from ``_depthwise_bwd_input_kernel`` (a gather: no atomics) and ``_depthwise_bwd_weight_kernel``
(fixed-order reductions: deterministic).

Dtypes: float32, float16 and bfloat16 on CUDA (fp32 accumulation everywhere); float32 under
``TRITON_INTERPRET=1`` on CPU tensors.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fastseg.triton_kernels._common import check_dtype, interpreting, pow2

from fastseg.ops._autograd import register_separable_conv2d_autograd
from fastseg.ops._reference import conv_out_size

__all__ = ["separable_conv2d"]

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _depthwise_tile(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw) in elements, any dtype
    w_ptr,  # [C, 1, K, K], strides (swc, -, swh, sww)
    n,  # image index (int64)
    offs_c,  # [BLOCK_C] channel indices (int64)
    mask_c,  # [BLOCK_C]
    offs_p,  # [BLOCK_P] flattened output pixel indices oh * Wo + ow
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


@triton.jit
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
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dot (no TF32)
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)  # over N * cdiv(P, BLOCK_P)
    pid_o = tl.program_id(1)  # over cdiv(OC, BLOCK_O)
    tiles = tl.cdiv(P, BLOCK_P)
    n = (pid_p // tiles).to(tl.int64)
    offs_p = (pid_p % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < OC

    acc = tl.zeros((BLOCK_O, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask_c = offs_c < C
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
        if IEEE:
            acc = tl.dot(pw, y, acc, input_precision="ieee")
        else:
            acc = tl.dot(pw, y.to(pw.dtype), acc)

    if HAS_PS:
        acc = acc * tl.load(ps_ptr + offs_o, mask=mask_o, other=0.0)[:, None]
    if HAS_PH:
        acc = acc + tl.load(ph_ptr + offs_o, mask=mask_o, other=0.0)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_ptrs = out_ptr + n * OC * P + offs_o[:, None].to(tl.int64) * P + offs_p[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_p[None, :])


@triton.jit
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


@triton.jit
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


@triton.jit
def _depthwise_bwd_weight_kernel(
    g_ptr,  # [N, C, Ho, Wo] fp32 contiguous grad of the depthwise output, strides (C*P, P, Wo, 1)
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw), any float dtype
    part_ptr,  # [SPLIT, C, K*K] fp32 contiguous partial sums, strides (C*K*K, K*K, 1)
    C, H, W, Wo, P, NP, chunk,  # NP = N * P; each split reduces `chunk` (a multiple of BLOCK_P) of it
    sxn, sxc, sxh, sxw,
    stride, pad_beg, dilation,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad w[c, i, j] = sum over (n, oh, ow) of g[n, c, oh, ow] * x[n, c, oh*s - pb + i*d, ow*s - pb + j*d],
    one program per (channel block, tap, split), in a fixed order (deterministic)."""
    pid_c = tl.program_id(0)  # over cdiv(C, BLOCK_C)
    tap = tl.program_id(1)  # over K * K
    pid_s = tl.program_id(2)  # over SPLIT
    ti = tap // K
    tj = tap % K
    offs_c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    start = pid_s.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, NP)
    for q0 in range(start, end, BLOCK_P):
        q = q0 + tl.arange(0, BLOCK_P)
        mask_q = q < end
        n = q // P
        p = q % P
        oh = p // Wo
        ow = p % Wo
        ih = oh * stride - pad_beg + ti * dilation
        iw = ow * stride - pad_beg + tj * dilation
        mx = mask_q & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        gv = tl.load(g_ptr + offs_c[:, None] * P + (n * C * P + p)[None, :],
                     mask=mask_c[:, None] & mask_q[None, :], other=0.0)
        xv = tl.load(x_ptr + offs_c[:, None] * sxc + (n * sxn + ih * sxh + iw * sxw)[None, :],
                     mask=mask_c[:, None] & mx[None, :], other=0.0)
        acc += gv * xv.to(tl.float32)
    total = tl.sum(acc, axis=1)
    tl.store(part_ptr + (pid_s * C + offs_c) * (K * K) + tap, total, mask=mask_c)


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


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
    # tl.dot needs every dimension >= 16 on a GPU. Sizes checked with ptxas for sm_80/sm_90 (no
    # spills at k = 3 with 8 warps; the exact-fp32 dot gets the smaller output-channel tile).
    BLOCK_O = pow2(OC, 16, 64 if x.dtype == torch.float32 else 128)
    BLOCK_C = 16
    BLOCK_P = pow2(P, 16, 64 if k <= 3 else 32)
    grid = (N * triton.cdiv(P, BLOCK_P), triton.cdiv(OC, BLOCK_O))
    kernel = _separable_conv2d_fwd_kernel if interpreting() else wrap_triton(_separable_conv2d_fwd_kernel)
    kernel[grid](
        x, dw_weight, pw2, *[dummy if t is None else t for t in affine], out,
        C, OC, H, W, Wo, P,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        dw_weight.stride(0), dw_weight.stride(2), dw_weight.stride(3),
        pw2.stride(0), pw2.stride(1),
        stride, pad_beg, dilation,
        K=k, HAS_DS=affine[0] is not None, HAS_DH=affine[1] is not None, DW_RELU=dw_relu,
        HAS_PS=affine[2] is not None, HAS_PH=affine[3] is not None, RELU=relu,
        IEEE=x.dtype == torch.float32, BLOCK_O=BLOCK_O, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
        num_warps=8, num_stages=2,
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
    kernel = _depthwise_fwd_kernel if interpreting() else wrap_triton(_depthwise_fwd_kernel)
    kernel[grid](
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
    kernel = _depthwise_bwd_input_kernel if interpreting() else wrap_triton(_depthwise_bwd_input_kernel)
    kernel[grid](
        grad, w, gx,
        C, H, W, Ho, Wo,
        w.stride(0), w.stride(2), w.stride(3),
        stride, pad_beg, dilation,
        K=k, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
    )
    return gx


def _launch_depthwise_bwd_weight(grad: Tensor, x: Tensor, k: int, stride: int, pad_beg: int,
                                 dilation: int, split: int | None = None) -> Tensor:
    """[C, 1, k, k] fp32 grad of the depthwise weight; grad [N, C, Ho, Wo] fp32 contiguous.

    The N*Ho*Wo reduction is cut into ``split`` fixed chunks (enough programs to fill a GPU),
    whose partial sums are added by torch in a fixed order: deterministic."""
    N, C, H, W = x.shape
    Ho, Wo = grad.shape[2], grad.shape[3]
    P = Ho * Wo
    NP = N * P
    if NP == 0 or C == 0:
        return torch.zeros((C, 1, k, k), device=x.device, dtype=torch.float32)
    BLOCK_C = pow2(C, 1, 16)
    BLOCK_P = pow2(NP, 16, 2048 // BLOCK_C)
    if split is None:
        # At least 32 iterations of BLOCK_P per program, at most 64 splits.
        split = max(1, min(64, triton.cdiv(NP, BLOCK_P * 32)))
    chunk = triton.cdiv(triton.cdiv(NP, split), BLOCK_P) * BLOCK_P
    split = triton.cdiv(NP, chunk)
    part = torch.empty((split, C, k * k), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(C, BLOCK_C), k * k, split)
    kernel = _depthwise_bwd_weight_kernel if interpreting() else wrap_triton(_depthwise_bwd_weight_kernel)
    kernel[grid](
        grad, x, part,
        C, H, W, Wo, P, NP, chunk,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        stride, pad_beg, dilation,
        K=k, BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
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
    with torch.autocast(device_type=x.device.type, enabled=False):
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
