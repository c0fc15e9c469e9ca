"""Triton backend of RoIAlign (torchvision.ops.roi_align) and AUNet's RoIUpsample.

Both ops are the same separable sandwich (csrc/ops/common/roi.h). For RoI k on image n and one
channel plane X [H, W], with the per-axis interpolation matrices A_y [ph, H] and A_x [pw, W]
(row p holds the summed bilinear weights of bin p's samples, torchvision's grid and clamping):

* gather:  roi_align(X)[k] = A_y X A_x^T          (roi_align, and roi_upsample's backward)
* scatter: roi_upsample(G)[n] = sum_k A_y^T G[k] A_x  (roi_upsample, and roi_align's backward)

The normalisation is part of the tables: "count" (roi_align / mode "adjoint") scales A_y by
1 / grid_h and A_x by 1 / grid_w (together 1 / count; per axis, so that the intermediate T = X A_x^T
stays within the data's range, which fp16 needs); "aunet" scales each sample's per-axis weights by
1 / (w_low^2 + w_high^2) and has no /count. So one gather and one scatter kernel serve all four ops:

* ``_roi_axis_table_kernel`` (a program per RoI, once per axis): the fp32 table
  A [K, pooled, length] of one axis (zero-initialised, only the RoI's pixel extent written) and the
  extent [lo, hi) of pixels that the RoI's valid samples touch (int32 [K, 4]: lo_y, hi_y, lo_x,
  hi_x). Geometry in fp32 whatever the data dtype, every division IEEE-rounded (``tl.div_rn``;
  a compiled ``/`` is not, and ceil(roi_h / pooled_h) of an exact multiple could gain a sample), in
  torchvision's order of operations.
* ``_roi_gather_kernel``: a program per (RoI k, BLOCK_C channels) walks the RoI's extent in
  BLOCK_Y x BLOCK_X tiles: T = X[(c, y), x] @ A_x^T[x, q] over the x tiles of a row band, then
  acc[(q, c), p] += T^T[(q, c), y] @ A_y^T[y, p] (T^T reshaped: no permute of channels), fp32
  accumulators, ``tl.dot`` throughout. Every output element is written by one program.
* ``_roi_scatter_kernel``: a program per (image n, TILE_H x TILE_W output tile, BLOCK_C channels)
  loops over the RoIs of image n (RoIs stably sorted by batch index, per-image start offsets,
  computed with torch ops), skips those whose extent misses the tile (a scalar test), and
  accumulates U = G[k][(c, p), q] @ A_x[q, x] and acc[(x, c), y] += U^T[(x, c), p] @ A_y[p, y].
  No atomics: each output tile has one owner that adds the RoIs in a fixed order, so the result
  is deterministic (bit-identical between runs) with or without
  ``torch.use_deterministic_algorithms``.

Ops (``torch.library.triton_op``): ``fastseg::roi_align_triton`` (gather, count),
``fastseg::_roi_align_triton_backward`` (scatter, count), ``fastseg::roi_upsample_triton``
(scatter, mode) and ``fastseg::_roi_upsample_triton_backward`` (gather, mode). Each is
differentiable through the other one of its pair (the maps are linear; rois get no gradient),
so double backward works as well.

Cost: the gather and the scatter are dense over a RoI's pixel extent (about extent_h x extent_w x
pw + extent_h x ph x pw multiply-adds per channel, on tensor cores for fp16 / bf16), not a loop over
the 4 taps of each sample. That is cheap for FPN-assigned RoIs (extents of tens of pixels) and
adaptive sampling; a RoI spanning a large map with a small fixed sampling_ratio reads its whole
extent where the tap loop would read a few pixels.

RoIs whose batch index (truncated toward zero, as torchvision reads it) lies outside [0, N) are
not read: roi_align gives zeros for them and roi_upsample drops them (the public API rejects them
before they get here).

Dtypes: float32, float16 and bfloat16 on CUDA (fp32 accumulation; for fp32 data the dots follow
``torch.get_float32_matmul_precision()`` like PyTorch's matmuls: the default "highest" is exact fp32,
"high" tf32x3, "medium" tf32; for fp16 / bf16 the tables and the intermediate T / U are rounded to
the data dtype for the dots; output in the data dtype); float32 (and float16) under
``TRITON_INTERPRET=1`` on CPU tensors. Under CUDA autocast the public functions follow torchvision's
roi_align policy: compute in float32, return in the input's dtype.

Launches run on the inputs' device and its current stream, whatever device is current.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import check_dtype, dot_precision, on_device, pow2
from fastseg.triton_kernels._common import kernel as _kernel

__all__ = ["roi_align", "roi_upsample"]

_MODES = ("adjoint", "aunet")

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _sample_tap(base, bin_, grid, i, length, AUNET: tl.constexpr):
    """Bilinear tap of sample i of every bin along one axis (torchvision's rules and order of
    operations): base [BLOCK_P] is each bin's start, grid (fp32, >= 1) the samples per bin.
    Returns (low, high, w_low, w_high, valid)."""
    v = base + tl.div_rn((i + 0.5) * bin_, grid)
    valid = (v >= -1.0) & (v <= length)
    v = tl.minimum(tl.maximum(v, 0.0), length + 0.0)  # the upper clamp only keeps invalid taps in range
    low = v.to(tl.int32)  # v >= 0: truncation is floor
    at_end = low >= length - 1
    low = tl.where(at_end, length - 1, low)
    high = tl.where(at_end, length - 1, low + 1)
    w_high = tl.where(at_end, 0.0, v - low.to(tl.float32))
    w_low = 1.0 - w_high
    if AUNET:
        s = tl.div_rn(1.0, w_low * w_low + w_high * w_high)  # >= 1/2: never 0
        w_low = w_low * s
        w_high = w_high * s
    return low, high, w_low, w_high, valid


@triton.jit(do_not_specialize=["sampling_ratio", "pooled_h", "pooled_w", "length"])
def _roi_axis_table_kernel(
    rois_ptr,  # [K, 5] fp32 contiguous, strides (5, 1): (batch_idx, x1, y1, x2, y2)
    table_ptr,  # [K, pooled, length] fp32 contiguous, zero-initialised: this axis' A (A_y or A_x)
    ext_ptr,  # [K, 4] int32 contiguous: (lo_y, hi_y, lo_x, hi_x); this program writes 2 of them
    spatial_scale, sampling_ratio, pooled_h, pooled_w, length,
    AXIS: tl.constexpr,  # 0: rows (y, A_y [K, pooled_h, H]), 1: columns (x, A_x [K, pooled_w, W])
    ALIGNED: tl.constexpr,  # shift by half a pixel, no size clamp
    AUNET: tl.constexpr,  # per-sample 1 / sum(w^2) weights; otherwise 1 / grid of this axis folded in
    BLOCK_P: tl.constexpr,  # pooled size padded to a power of two
    BLOCK_L: tl.constexpr,  # pixels per chunk of the table row
):
    k = tl.program_id(0).to(tl.int64)
    roi = rois_ptr + k * 5
    x1 = tl.load(roi + 1) * spatial_scale
    y1 = tl.load(roi + 2) * spatial_scale
    x2 = tl.load(roi + 3) * spatial_scale
    y2 = tl.load(roi + 4) * spatial_scale
    if ALIGNED:
        x1 = x1 - 0.5
        y1 = y1 - 0.5
        x2 = x2 - 0.5
        y2 = y2 - 0.5
    roi_w = x2 - x1
    roi_h = y2 - y1
    if not ALIGNED:  # legacy RoIAlign: malformed RoIs are forced to 1 x 1
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    if AXIS == 0:
        start = y1
        roi_len = roi_h
        pooled = pooled_h
    else:
        start = x1
        roi_len = roi_w
        pooled = pooled_w
    bin_ = tl.div_rn(roi_len, pooled.to(tl.float32))
    # A non-finite RoI has no samples (zeros, as torchvision's kernels give); x - x is 0 iff finite.
    finite = ((start - start) == 0.0) & ((roi_len - roi_len) == 0.0) & ((bin_ - bin_) == 0.0)
    start = tl.where(finite, start, 0.0)
    bin_ = tl.where(finite, bin_, 0.0)
    # The grid stays a float (exact integers): ceil of a huge bin does not fit an int.
    grid_n = tl.where(sampling_ratio > 0, sampling_ratio.to(tl.float32), tl.ceil(bin_))
    grid_n = tl.where(finite, tl.maximum(grid_n, 0.0), 0.0)  # an inverted aligned RoI: no samples
    grid_f = tl.maximum(tl.minimum(grid_n, 1099511627776.0), 1.0)  # roi.h's kMaxGrid = 2^40
    scale = 1.0
    if not AUNET:  # 1 / count = 1 / grid_h * 1 / grid_w, one factor per axis (the exact grid)
        scale = tl.div_rn(1.0, tl.maximum(grid_n, 1.0))

    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < pooled
    base = start + offs_p.to(tl.float32) * bin_
    # Only samples whose coordinate can lie in [-1, length] contribute: enumerate the span
    # [i0, i1) of each bin (roi.h's sample_span: linear in i, widened by the rounding margin
    # and one sample), so a huge RoI costs about (length + 1) / step samples per bin.
    grid_e = tl.minimum(grid_n, 1099511627776.0)
    step = tl.div_rn(bin_, grid_f)
    mg = 16.0 * 1.1920928955078125e-07 * (tl.abs(start) + (offs_p.to(tl.float32) + 1.0) * tl.abs(bin_))
    mg = tl.minimum(mg, length + 2.0)
    flat = step == 0.0  # every sample at one coordinate (grid is sampling_ratio: small)
    safe = tl.where(flat, 1.0, step)
    q0 = tl.div_rn(-1.0 - mg - base, safe) - 0.5
    q1 = tl.div_rn(length + mg - base, safe) - 0.5
    qa = tl.minimum(q0, q1)
    qb = tl.maximum(q0, q1)
    i0 = tl.where(flat, 0.0, tl.minimum(tl.maximum(tl.floor(qa) - 1.0, 0.0), grid_e))
    i1 = tl.where(flat, grid_e, tl.minimum(tl.maximum(tl.floor(qb) + 2.0, 0.0), grid_e))
    i0 = tl.where(mask_p, i0, 0.0).to(tl.int64)
    i1 = tl.where(mask_p, i1, 0.0).to(tl.int64)
    span = tl.max(i1 - i0, axis=0)

    # The pixel extent of the valid taps (samples may run backwards: take both ends).
    lo = tl.full((BLOCK_P,), length, dtype=tl.int32)
    hi = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for j in range(0, span):
        i = i0 + j
        low, high, w_low, w_high, valid = _sample_tap(base, bin_, grid_f, i.to(tl.float32), length, AUNET)
        valid = valid & mask_p & (i < i1)
        lo = tl.minimum(lo, tl.where(valid, low, length))
        hi = tl.maximum(hi, tl.where(valid, high + 1, 0))
    ext_lo = tl.min(lo, axis=0)
    ext_hi = tl.max(hi, axis=0)
    empty = ext_lo >= ext_hi
    ext_lo = tl.where(empty, 0, ext_lo)
    ext_hi = tl.where(empty, 0, ext_hi)
    tl.store(ext_ptr + k * 4 + 2 * AXIS, ext_lo)
    tl.store(ext_ptr + k * 4 + 2 * AXIS + 1, ext_hi)

    # The table rows over the extent; pixels outside it stay zero.
    row_ptrs = table_ptr + k * pooled * length + offs_p[:, None] * length  # [BLOCK_P, 1]
    for l0 in range(ext_lo, ext_hi, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        rows = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
        for j in range(0, span):
            i = i0 + j
            low, high, w_low, w_high, valid = _sample_tap(base, bin_, grid_f, i.to(tl.float32), length, AUNET)
            valid = valid & (i < i1)
            w_low = tl.where(valid, w_low, 0.0)
            w_high = tl.where(valid, w_high, 0.0)
            rows += tl.where(offs_l[None, :] == low[:, None], w_low[:, None], 0.0)
            rows += tl.where(offs_l[None, :] == high[:, None], w_high[:, None], 0.0)
        tl.store(row_ptrs + offs_l[None, :], rows * scale, mask=mask_p[:, None] & (offs_l < ext_hi)[None, :])


# Shapes are not specialised (== 1 / % 16): one compiled variant serves every image, channel count
# and output size. The strides are, so that unit-stride rows load as vectors.
@triton.jit(do_not_specialize=["N", "C", "H", "W", "ph", "pw"])
def _roi_gather_kernel(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw) in elements: any memory format
    ty_ptr,  # [K, ph, H] fp32 contiguous: A_y
    tx_ptr,  # [K, pw, W] fp32 contiguous: A_x
    ext_ptr,  # [K, 4] int32 contiguous: (lo_y, hi_y, lo_x, hi_x) pixel extent of each RoI
    batch_ptr,  # [K] int64 contiguous: image index of each RoI
    out_ptr,  # [K, C, ph, pw] contiguous, strides (C*ph*pw, ph*pw, pw, 1); dtype of x
    N, C, H, W, ph, pw,
    sxn, sxc, sxh, sxw,
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_PH: tl.constexpr,  # ph padded to a power of two >= 16
    BLOCK_PW: tl.constexpr,  # pw padded to a power of two >= 16
    BLOCK_Y: tl.constexpr,  # extent rows per band (>= 16)
    BLOCK_X: tl.constexpr,  # extent columns per tile (>= 16)
):
    k = tl.program_id(0).to(tl.int64)  # over K
    c0 = tl.program_id(1) * BLOCK_C  # over cdiv(C, BLOCK_C)
    dt = x_ptr.dtype.element_ty
    n = tl.load(batch_ptr + k)
    lo_y = tl.load(ext_ptr + k * 4)
    hi_y = tl.load(ext_ptr + k * 4 + 1)
    lo_x = tl.load(ext_ptr + k * 4 + 2)
    hi_x = tl.load(ext_ptr + k * 4 + 3)
    hi_y = tl.where((n >= 0) & (n < N), hi_y, lo_y)  # a RoI of no image reads nothing

    # Rows of an X tile are (channel, row) pairs: r = c * BLOCK_Y + y.
    offs_r = tl.arange(0, BLOCK_C * BLOCK_Y)
    rc = c0 + offs_r // BLOCK_Y
    ry = offs_r % BLOCK_Y
    x_rows = x_ptr + n * sxn + rc.to(tl.int64) * sxc  # [BLOCK_C * BLOCK_Y]
    offs_p = tl.arange(0, BLOCK_PH)
    offs_q = tl.arange(0, BLOCK_PW)
    tx_cols = tx_ptr + k * pw * W + offs_q[None, :] * W  # [1, BLOCK_PW]: A_x^T columns
    ty_cols = ty_ptr + k * ph * H + offs_p[None, :] * H  # [1, BLOCK_PH]: A_y^T columns

    acc = tl.zeros((BLOCK_PW * BLOCK_C, BLOCK_PH), dtype=tl.float32)  # rows (q, c)
    for y0 in range(lo_y, hi_y, BLOCK_Y):
        ys = y0 + ry
        mask_r = (rc < C) & (ys < hi_y)
        t = tl.zeros((BLOCK_C * BLOCK_Y, BLOCK_PW), dtype=tl.float32)  # X A_x^T of this row band
        for x0 in range(lo_x, hi_x, BLOCK_X):
            xs = x0 + tl.arange(0, BLOCK_X)
            mask_x = xs < hi_x
            xt = tl.load(x_rows[:, None] + ys[:, None] * sxh + xs[None, :] * sxw,
                         mask=mask_r[:, None] & mask_x[None, :], other=0.0)  # [BLOCK_C * BLOCK_Y, BLOCK_X]
            axt = tl.load(tx_cols + xs[:, None], mask=mask_x[:, None] & (offs_q < pw)[None, :],
                          other=0.0)  # [BLOCK_X, BLOCK_PW]
            t = tl.dot(xt, axt.to(dt), t, input_precision=PRECISION)
        yy = y0 + tl.arange(0, BLOCK_Y)
        ayt = tl.load(ty_cols + yy[:, None], mask=(yy < hi_y)[:, None] & (offs_p < ph)[None, :],
                      other=0.0)  # [BLOCK_Y, BLOCK_PH]
        tt = tl.reshape(tl.trans(t), (BLOCK_PW * BLOCK_C, BLOCK_Y))  # rows (q, c)
        acc = tl.dot(tt.to(dt), ayt.to(dt), acc, input_precision=PRECISION)

    offs_o = tl.arange(0, BLOCK_PW * BLOCK_C)
    oq = offs_o // BLOCK_C
    oc = c0 + offs_o % BLOCK_C
    out_ptrs = out_ptr + k * C * ph * pw + (oc.to(tl.int64) * ph * pw + oq)[:, None] + offs_p[None, :] * pw
    mask = ((oq < pw) & (oc < C))[:, None] & (offs_p < ph)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["C", "H", "W", "ph", "pw"])  # as the gather
def _roi_scatter_kernel(
    g_ptr,  # [K, C, ph, pw], strides (sgk, sgc, sgh, sgw) in elements: any memory format
    ty_ptr,  # [K, ph, H] fp32 contiguous: A_y
    tx_ptr,  # [K, pw, W] fp32 contiguous: A_x
    ext_ptr,  # [K, 4] int32 contiguous: (lo_y, hi_y, lo_x, hi_x) pixel extent of each RoI
    order_ptr,  # [K] int64 contiguous: RoI indices stably sorted by image
    start_ptr,  # [N + 1] int64 contiguous: image n's RoIs are order[start[n]:start[n + 1]]
    out_ptr,  # [N, C, H, W] contiguous, strides (C*H*W, H*W, W, 1); dtype of g
    C, H, W, ph, pw,
    sgk, sgc, sgh, sgw,
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_PH: tl.constexpr,  # ph padded to a power of two >= 16
    BLOCK_PW: tl.constexpr,  # pw padded to a power of two >= 16
    TILE_H: tl.constexpr,  # output rows per program (>= 16)
    TILE_W: tl.constexpr,  # output columns per program (>= 16)
):
    pid = tl.program_id(0)  # over N * cdiv(H, TILE_H) * cdiv(W, TILE_W)
    c0 = tl.program_id(1) * BLOCK_C  # over cdiv(C, BLOCK_C)
    tiles_w = tl.cdiv(W, TILE_W)
    tiles = tl.cdiv(H, TILE_H) * tiles_w
    n = (pid // tiles).to(tl.int64)
    y0 = (pid % tiles) // tiles_w * TILE_H
    x0 = (pid % tiles) % tiles_w * TILE_W
    dt = g_ptr.dtype.element_ty

    # Rows of a G tile are (channel, bin row) pairs: r = c * BLOCK_PH + p.
    offs_r = tl.arange(0, BLOCK_C * BLOCK_PH)
    rc = c0 + offs_r // BLOCK_PH
    rp = offs_r % BLOCK_PH
    mask_r = (rc < C) & (rp < ph)
    g_rows = rc.to(tl.int64) * sgc + rp * sgh  # [BLOCK_C * BLOCK_PH]
    offs_p = tl.arange(0, BLOCK_PH)
    offs_q = tl.arange(0, BLOCK_PW)
    xs = x0 + tl.arange(0, TILE_W)
    ys = y0 + tl.arange(0, TILE_H)
    mask_ax = (offs_q < pw)[:, None] & (xs < W)[None, :]
    mask_ay = (offs_p < ph)[:, None] & (ys < H)[None, :]

    acc = tl.zeros((TILE_W * BLOCK_C, TILE_H), dtype=tl.float32)  # rows (x, c)
    j0 = tl.load(start_ptr + n)
    j1 = tl.load(start_ptr + n + 1)
    for j in range(j0, j1):  # this image's RoIs, in a fixed order
        k = tl.load(order_ptr + j)
        lo_y = tl.load(ext_ptr + k * 4)
        hi_y = tl.load(ext_ptr + k * 4 + 1)
        lo_x = tl.load(ext_ptr + k * 4 + 2)
        hi_x = tl.load(ext_ptr + k * 4 + 3)
        if (lo_y < y0 + TILE_H) & (hi_y > y0) & (lo_x < x0 + TILE_W) & (hi_x > x0):
            g = tl.load(g_ptr + k * sgk + g_rows[:, None] + offs_q[None, :] * sgw,
                        mask=mask_r[:, None] & (offs_q < pw)[None, :], other=0.0)  # [BLOCK_C * BLOCK_PH, BLOCK_PW]
            ax = tl.load(tx_ptr + k * pw * W + offs_q[:, None] * W + xs[None, :], mask=mask_ax,
                         other=0.0)  # [BLOCK_PW, TILE_W]
            u = tl.dot(g, ax.to(dt), tl.zeros((BLOCK_C * BLOCK_PH, TILE_W), dtype=tl.float32),
                       input_precision=PRECISION)
            ay = tl.load(ty_ptr + k * ph * H + offs_p[:, None] * H + ys[None, :], mask=mask_ay,
                         other=0.0)  # [BLOCK_PH, TILE_H]
            ut = tl.reshape(tl.trans(u), (TILE_W * BLOCK_C, BLOCK_PH))  # rows (x, c)
            acc = tl.dot(ut.to(dt), ay.to(dt), acc, input_precision=PRECISION)

    offs_o = tl.arange(0, TILE_W * BLOCK_C)
    ox = x0 + offs_o // BLOCK_C
    oc = c0 + offs_o % BLOCK_C
    out_ptrs = out_ptr + n * C * H * W + (oc.to(tl.int64) * H * W + ox)[:, None] + ys[None, :] * W
    mask = ((ox < W) & (oc < C))[:, None] & (ys < H)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


def _blocks(C: int, ph: int, pw: int, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Block sizes of the gather and scatter kernels. tl.dot needs every dimension >= 16 on a GPU,
    so the pooled sizes are padded to powers of two >= 16 (7 -> 16, 14 -> 16, 28 -> 32); the channel
    blocks keep the fp32 accumulators at <= 2048 (gather; 1024 for fp32 data, whose exact "ieee" dots
    need more registers) / 4096 (scatter) elements.

    Compiled for sm_90a (Triton 3.6 and 3.8, bench/triton_sm90_compile.py, no GPU run) at the
    benchmark's 7x7, 14x14 and 28x28 maps in fp32, fp16 and bf16: no spills (the 28x28 fp32 gather
    spilled 24-32 bytes with two channels per program)."""
    bph, bpw = pow2(ph, 16, 1 << 20), pow2(pw, 16, 1 << 20)
    block_y, block_x, tile = 16, 32, 32
    gather_budget = 1024 if dtype == torch.float32 else 2048
    gather_c = pow2(C, 1, max(1, min(4, gather_budget // (bph * bpw))))
    scatter_c = pow2(C, 1, max(1, min(4, 4096 // max(bph * bpw, bph * tile, tile * tile))))
    return dict(BLOCK_PH=bph, BLOCK_PW=bpw, BLOCK_Y=block_y, BLOCK_X=block_x, GATHER_C=gather_c,
                TILE_H=tile, TILE_W=tile, SCATTER_C=scatter_c, WARPS=4 if bph * bpw <= 256 else 8)


def _roi_tables(rois: Tensor, pooled_h: int, pooled_w: int, height: int, width: int, spatial_scale: float,
                sampling_ratio: int, aligned: bool, aunet: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(A_y [K, pooled_h, height], A_x [K, pooled_w, width], extent [K, 4] int32 (lo_y, hi_y, lo_x, hi_x)),
    fp32, for K > 0 RoIs."""
    K = rois.shape[0]
    r = rois.to(torch.float32).contiguous()
    ty = torch.zeros((K, pooled_h, height), device=rois.device, dtype=torch.float32)
    tx = torch.zeros((K, pooled_w, width), device=rois.device, dtype=torch.float32)
    ext = torch.empty((K, 4), device=rois.device, dtype=torch.int32)
    kernel = _kernel(_roi_axis_table_kernel)
    for axis, table, pooled, length in ((0, ty, pooled_h, height), (1, tx, pooled_w, width)):
        block_p = pow2(pooled, 1, 1 << 20)
        block_l = pow2(length, 16, max(16, 1024 // block_p))  # 2048 spilled 40 B (fp32, aunet, 28x28) on sm_90a
        kernel[(K,)](
            r, table, ext,
            spatial_scale, sampling_ratio, pooled_h, pooled_w, length,
            AXIS=axis, ALIGNED=aligned, AUNET=aunet, BLOCK_P=block_p, BLOCK_L=block_l, num_warps=4,
        )
    return ty, tx, ext


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _launch_roi_gather(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
                       sampling_ratio: int, aligned: bool, aunet: bool,
                       blocks: dict[str, int] | None = None) -> Tensor:
    """[K, C, pooled_h, pooled_w] contiguous in x's dtype: A_y X A_x^T per RoI (x any strides)."""
    N, C, H, W = x.shape
    K = rois.shape[0]
    if K * C == 0 or N * H * W == 0:
        return torch.zeros((K, C, pooled_h, pooled_w), device=x.device, dtype=x.dtype)
    ty, tx, ext = _roi_tables(rois, pooled_h, pooled_w, H, W, spatial_scale, sampling_ratio, aligned, aunet)
    batch = rois[:, 0].to(torch.int64).contiguous()  # truncation toward zero, as torchvision reads it
    out = torch.empty((K, C, pooled_h, pooled_w), device=x.device, dtype=x.dtype)
    bs = blocks or _blocks(C, pooled_h, pooled_w, x.dtype)
    _kernel(_roi_gather_kernel)[(K, triton.cdiv(C, bs["GATHER_C"]))](
        x, ty, tx, ext, batch, out,
        N, C, H, W, pooled_h, pooled_w,
        *_strides(x),
        PRECISION=dot_precision(x.dtype),
        BLOCK_C=bs["GATHER_C"], BLOCK_PH=bs["BLOCK_PH"], BLOCK_PW=bs["BLOCK_PW"],
        BLOCK_Y=bs["BLOCK_Y"], BLOCK_X=bs["BLOCK_X"], num_warps=bs["WARPS"],
    )
    return out


def _launch_roi_scatter(g: Tensor, rois: Tensor, batch_size: int, height: int, width: int, spatial_scale: float,
                        sampling_ratio: int, aligned: bool, aunet: bool,
                        blocks: dict[str, int] | None = None) -> Tensor:
    """[batch_size, C, height, width] contiguous in g's dtype: sum over each image's RoIs of
    A_y^T G A_x (g [K, C, ph, pw] any strides)."""
    K, C, ph, pw = g.shape
    N = batch_size
    if K == 0 or N * C * height * width == 0:
        return torch.zeros((N, C, height, width), device=g.device, dtype=g.dtype)
    ty, tx, ext = _roi_tables(rois, ph, pw, height, width, spatial_scale, sampling_ratio, aligned, aunet)
    batch = rois[:, 0].to(torch.int64)
    order = torch.argsort(batch, stable=True)
    start = torch.searchsorted(batch[order].contiguous(), torch.arange(N + 1, device=g.device, dtype=torch.int64))
    out = torch.empty((N, C, height, width), device=g.device, dtype=g.dtype)
    bs = blocks or _blocks(C, ph, pw, g.dtype)
    tiles = triton.cdiv(height, bs["TILE_H"]) * triton.cdiv(width, bs["TILE_W"])
    _kernel(_roi_scatter_kernel)[(N * tiles, triton.cdiv(C, bs["SCATTER_C"]))](
        g, ty, tx, ext, order, start, out,
        C, height, width, ph, pw,
        *_strides(g),
        PRECISION=dot_precision(g.dtype),
        BLOCK_C=bs["SCATTER_C"], BLOCK_PH=bs["BLOCK_PH"], BLOCK_PW=bs["BLOCK_PW"],
        TILE_H=bs["TILE_H"], TILE_W=bs["TILE_W"], num_warps=bs["WARPS"],
    )
    return out


# ---- ops ---------------------------------------------------------------------------------------


def _check(op: str, name: str, x: Tensor, rois: Tensor) -> None:
    check_dtype(op, name, x)
    if x.dim() != 4:
        raise ValueError(f"{op}: {name} must be 4-D, got shape {tuple(x.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5 or not rois.is_floating_point():
        raise ValueError(f"{op}: rois must be a floating [K, 5] tensor (batch_idx, x1, y1, x2, y2), got "
                         f"{rois.dtype} {tuple(rois.shape)}")
    if rois.device != x.device:
        raise ValueError(f"{op}: rois is on {rois.device} but {name} is on {x.device}")


def _aunet(mode: str) -> bool:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode == "aunet"


@torch.library.triton_op("fastseg::roi_align_triton", mutates_args=())
def _roi_align_triton(features: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
                      sampling_ratio: int, aligned: bool) -> Tensor:
    _check("roi_align", "features", features, rois)
    with on_device(features):
        return _launch_roi_gather(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, False)


@torch.library.triton_op("fastseg::_roi_align_triton_backward", mutates_args=())
def _roi_align_triton_backward(grad: Tensor, rois: Tensor, batch_size: int, height: int, width: int,
                               spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """grad of features [batch_size, C, height, width]: the scatter with count normalisation."""
    _check("roi_align", "grad", grad, rois)
    with on_device(grad):
        return _launch_roi_scatter(grad, rois, batch_size, height, width, spatial_scale, sampling_ratio, aligned,
                                   False)


@torch.library.triton_op("fastseg::roi_upsample_triton", mutates_args=())
def _roi_upsample_triton(roi_maps: Tensor, rois: Tensor, batch_size: int, height: int, width: int,
                         spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    _check("roi_upsample", "roi_maps", roi_maps, rois)
    if roi_maps.shape[0] != rois.shape[0]:
        raise ValueError(f"roi_upsample: roi_maps has {roi_maps.shape[0]} maps but rois has {rois.shape[0]} boxes")
    aunet = _aunet(mode)
    with on_device(roi_maps):
        return _launch_roi_scatter(roi_maps, rois, batch_size, height, width, spatial_scale, sampling_ratio, aligned,
                                   aunet)


@torch.library.triton_op("fastseg::_roi_upsample_triton_backward", mutates_args=())
def _roi_upsample_triton_backward(grad: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
                                  sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    """grad of roi_maps [K, C, pooled_h, pooled_w]: the gather with mode's normalisation."""
    _check("roi_upsample", "grad", grad, rois)
    aunet = _aunet(mode)
    with on_device(grad):
        return _launch_roi_gather(grad, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, aunet)


# Autograd: each op's backward is the other op of its pair with the same geometry (the maps are
# linear), so every order of derivative works; rois get no gradient (as in torchvision).


def _roi_align_setup(ctx, inputs, output):
    features, rois, _, _, *ctx.geometry = inputs  # geometry: spatial_scale, sampling_ratio, aligned
    ctx.size = (features.shape[0], features.shape[2], features.shape[3])
    ctx.dtype = features.dtype
    ctx.save_for_backward(rois)


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg._roi_align_triton_backward(grad.to(ctx.dtype), rois, *ctx.size, *ctx.geometry)
    return (g,) + (None,) * 6


def _roi_align_backward_setup(ctx, inputs, output):
    grad, rois, _, _, _, *ctx.geometry = inputs
    ctx.pooled = (grad.shape[2], grad.shape[3])
    ctx.dtype = grad.dtype
    ctx.save_for_backward(rois)


def _roi_align_backward_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg.roi_align_triton(grad.to(ctx.dtype), rois, *ctx.pooled, *ctx.geometry)
    return (g,) + (None,) * 7


def _roi_upsample_setup(ctx, inputs, output):
    roi_maps, rois, _, _, _, *ctx.geometry = inputs  # geometry: scale, sampling_ratio, aligned, mode
    ctx.pooled = (roi_maps.shape[2], roi_maps.shape[3])
    ctx.dtype = roi_maps.dtype
    ctx.save_for_backward(rois)


def _roi_upsample_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg._roi_upsample_triton_backward(grad.to(ctx.dtype), rois, *ctx.pooled, *ctx.geometry)
    return (g,) + (None,) * 8


def _roi_upsample_backward_setup(ctx, inputs, output):
    grad, rois, _, _, *ctx.geometry = inputs
    ctx.size = (grad.shape[0], grad.shape[2], grad.shape[3])
    ctx.dtype = grad.dtype
    ctx.save_for_backward(rois)


def _roi_upsample_backward_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    g = torch.ops.fastseg.roi_upsample_triton(grad.to(ctx.dtype), rois, *ctx.size, *ctx.geometry)
    return (g,) + (None,) * 7


torch.library.register_autograd("fastseg::roi_align_triton", _roi_align_backward, setup_context=_roi_align_setup)
torch.library.register_autograd("fastseg::_roi_align_triton_backward", _roi_align_backward_backward,
                                setup_context=_roi_align_backward_setup)
torch.library.register_autograd("fastseg::roi_upsample_triton", _roi_upsample_backward,
                                setup_context=_roi_upsample_setup)
torch.library.register_autograd("fastseg::_roi_upsample_triton_backward", _roi_upsample_backward_backward,
                                setup_context=_roi_upsample_backward_setup)


def _fp32_autocast(t: Tensor) -> bool:
    """torchvision's autocast policy for RoIAlign: compute in float32, return the input's dtype."""
    return t.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def roi_align(features: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision.ops.roi_align on Triton (positional form of ``fastseg.ops.roi_align``, which checks
    the arguments).

    Args:
        features: [N, C, H, W], any strides; float32 (float16 / bfloat16 on CUDA).
        rois: [K, 5] (batch_idx, x1, y1, x2, y2), floating (read in float32).
        pooled_h, pooled_w: output size; spatial_scale, sampling_ratio, aligned: as torchvision.

    Returns:
        [K, C, pooled_h, pooled_w] contiguous in features' dtype. Under CUDA autocast the kernels run
        in float32 and the result is cast back to features' dtype (torchvision's policy).

    Example::

        >>> out = roi_align(feats, rois, 7, 7, 0.25, 2, True)  # feats [2, 256, 50, 76], rois [K, 5]
    """
    check_dtype("roi_align", "features", features)
    args = (int(pooled_h), int(pooled_w), float(spatial_scale), int(sampling_ratio), bool(aligned))
    if _fp32_autocast(features):
        return torch.ops.fastseg.roi_align_triton(features.float(), rois.float(), *args).to(features.dtype)
    return torch.ops.fastseg.roi_align_triton(features, rois, *args)


def roi_upsample(roi_maps: Tensor, rois: Tensor, batch_size: int, height: int, width: int, spatial_scale: float,
                 sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    """AUNet's RoIUpsample on Triton (positional form of ``fastseg.ops.roi_upsample``).

    Args:
        roi_maps: [K, C, m, m'] per-RoI maps, any strides; float32 (float16 / bfloat16 on CUDA).
        rois: [K, 5] (batch_idx, x1, y1, x2, y2), floating (read in float32).
        batch_size, height, width: the output size [N, C, H, W].
        mode: "adjoint" (the exact transpose of roi_align) or "aunet" (1 / sum(w^2) per sample).

    Returns:
        [batch_size, C, height, width] contiguous in roi_maps' dtype; overlapping RoIs sum (in a fixed
        order: deterministic). Under CUDA autocast the kernels run in float32 and the result is cast
        back to roi_maps' dtype.

    Example::

        >>> out = roi_upsample(masks, rois, 2, 50, 76, 0.25, 2, True, "aunet")  # masks [K, 1, 28, 28]
    """
    check_dtype("roi_upsample", "roi_maps", roi_maps)
    args = (int(batch_size), int(height), int(width), float(spatial_scale), int(sampling_ratio), bool(aligned),
            str(mode))
    if _fp32_autocast(roi_maps):
        return torch.ops.fastseg.roi_upsample_triton(roi_maps.float(), rois.float(), *args).to(roi_maps.dtype)
    return torch.ops.fastseg.roi_upsample_triton(roi_maps, rois, *args)
