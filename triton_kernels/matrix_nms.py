"""Triton backend of the Matrix NMS (SOLOv2) decay, ``fastseg::matrix_nms_decay`` semantics.

Positions j = 0..n-1 are the masks order[j] (score order). Mask j is decayed by every higher-scored
mask i of its label (csrc/ops/common/matrix_nms.h):

    decay_j = min(1, min_{i < j, same label} f(iou_ij) / f(comp_i)),
    comp_i  = max_{k < i, same label} iou_ki   (0 for the first of a label),

f(x) = exp(-sigma x^2) (gaussian) or 1 - x (linear); a term with f(comp_i) == 0 applies no decay;
iou = inter / (area_i + area_j - inter), 0 when that union is <= 0; inter is the exact count of
pixels set in both masks; area is the pixel count, or mask_area[order[j]] when given.

Only same-label pairs interact, so the positions are first grouped by label (a stable sort of
labels[order] with torch ops: score order is kept inside a group; ``start[p]`` is the first
grouped position of p's label). Same-label pairs then lie in diagonal blocks of the n x n pair
matrix, and a tile of pairs with none of them is skipped. No atomics on floats anywhere.

* ``_matrix_nms_tile_kernel``: a program per (BLOCK_P x BLOCK_Q tile of grouped positions, K
  split) computes the exact intersections inter[p, q] = sum_k m_p[k] m_q[k] of the tile with
  ``tl.dot`` of 0/1 int8 tiles read straight from the masks (bool viewed as uint8; uint8 counts
  where != 0) and int32 accumulation: exact, and on tensor cores on a GPU. No float (or any) copy
  of the masks is made. Tiles with no pair of their MODE (below the diagonal, or across labels) do
  no work. MODE 0 writes the pairs start[q] <= p <= q into an n x n int32 buffer (the diagonal
  p == q is the area); with more than one K split (few tiles, large H*W: fill the GPU) the splits
  add their partial counts with int32 ``atomic_add`` into a zeroed buffer: still exact.
* ``_matrix_nms_comp_kernel``: a program per BLOCK_Q columns q walks the rows p in
  [start[q], q) of that buffer and writes f(comp_q) in float64.
* ``_matrix_nms_decay_kernel``: the same walk; decay_q = min(1, min_p f(iou_pq) / f(comp_p)),
  stored at the position perm[q] of the output (back to order's positions).

IoUs and the decay are float64 throughout, with the CPU kernel's operation order
((area_p + area_q) - inter, then inter / union; (-sigma * x) * x), so every backend takes the same
decisions. sigma is passed as a one-element float64 tensor (a Python float argument would be fp32).

Memory: the n x n int32 buffer takes 4 n^2 bytes (1 MB for SOLOv2's nms_pre = 500, 64 MB at
n = 4096, e.g. a batch of 8 images as one call). Keeping it, instead of recomputing the
intersections in each pass, halves the O(n^2 H W) work, and the column passes need no atomics.
Above n = 4096 the large-n path keeps O(n) memory instead: ``_matrix_nms_area_kernel`` counts the
areas (unless given), then the tile kernel runs twice without storing a tile, MODE 1 reducing each
tile's columns to max IoU and ``atomic_max`` of the bits into comp[q] (IoU >= 0: the bits order as
the values), MODE 2 to the min ratio and ``atomic_min`` into an int64 order key of decay[q]
(negative decays, from a mask_area below the pixel counts, included). Integer atomics on exact
values: either path is bit-identical between runs and to the other.

Packed masks (``matrix_nms_packed_decay``, int64 words of 64 pixels as fastseg.ops.dynamic_mask_head
returns them): the tiles above take 0/1 bytes for the int8 ``tl.dot``, so ``_unpack_bits_kernel``
first expands the words to bytes on the device (n0 x words*64 bytes); the rest is the same path.

Works on CUDA tensors and, under ``TRITON_INTERPRET=1``, on CPU tensors.
"""

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import kernel as _kernel, on_device

__all__ = ["matrix_nms_decay", "matrix_nms_packed_decay"]

_KERNELS = ("gaussian", "linear")
_FUSED_MIN_N = 4096  # above: no n x n buffer (64 MB at 4096), the intersections are computed twice
_ONE_KEY = 0x3FF0000000000000  # the bits of 1.0 (the order key of a positive float64 is its bits)

# ---- kernels ---------------------------------------------------------------------------------


# Sizes are not specialised (== 1 / % 16): one compiled variant serves every n and image size. The
# strides are, so that 16-byte aligned rows load as vectors.
@triton.jit(do_not_specialize=["n", "HW"])
def _matrix_nms_tile_kernel(
    masks_ptr,  # [n0, HW] uint8 (bool viewed as uint8), strides (s_m, s_k) in elements, any
    idx_ptr,  # [n] int64 contiguous: mask index order[perm[p]] of grouped position p
    start_ptr,  # [n] int64 contiguous: first grouped position of p's label (nondecreasing)
    area_ptr,  # MODE 1, 2: [n] float64 contiguous areas of the grouped positions
    comp_ptr,  # MODE 2: [n] int64 contiguous, the bits of comp_p (MODE 1's result)
    sigma_ptr,  # MODE 2: [1] float64
    out_ptr,  # MODE 0: [n, n] int32 inter[p, q] (start[q] <= p <= q); 1: [n] comp bits; 2: [n] decay keys
    n, HW, s_m, s_k,
    MODE: tl.constexpr,  # 0: store the intersections; 1: comp (atomic max); 2: decay (atomic min)
    KERNEL: tl.constexpr,  # MODE 2: 0 gaussian, 1 linear (0 otherwise: one compiled variant)
    BINARY: tl.constexpr,  # the mask bytes are 0 / 1 (bool): no normalisation
    ATOMIC: tl.constexpr,  # MODE 0, several K splits: atomic_add into a zeroed buffer
    SPLIT_K: tl.constexpr,  # programs along axis 2, each taking every SPLIT_K-th K block (1 unless MODE 0)
    BLOCK_P: tl.constexpr,  # rows p per tile
    BLOCK_Q: tl.constexpr,  # columns q per tile
    BLOCK_K: tl.constexpr,  # pixels per step
):
    pid_p = tl.program_id(0)  # over cdiv(n, BLOCK_P)
    pid_q = tl.program_id(1)  # over cdiv(n, BLOCK_Q)
    pid_k = tl.program_id(2)  # over SPLIT_K
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < n
    mask_q = offs_q < n
    start_q = tl.load(start_ptr + offs_q, mask=mask_q, other=0)
    # The pairs this tile owns: p of q's label, p <= q (MODE 0: the diagonal holds the areas) or p < q.
    if MODE == 0:
        upper = offs_p[:, None] <= offs_q[None, :]
    else:
        upper = offs_p[:, None] < offs_q[None, :]
    pair = (offs_p[:, None] >= start_q[None, :]) & upper & mask_p[:, None] & mask_q[None, :]
    if tl.max(pair.to(tl.int32)) > 0:
        rows_p = tl.load(idx_ptr + offs_p, mask=mask_p, other=0)  # int64: rows may be far apart
        rows_q = tl.load(idx_ptr + offs_q, mask=mask_q, other=0)
        base_p = masks_ptr + rows_p[:, None] * s_m  # [BLOCK_P, 1]
        base_q = masks_ptr + rows_q[:, None] * s_m  # [BLOCK_Q, 1]
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.int32)
        for k0 in range(pid_k * BLOCK_K, HW, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < HW
            a = tl.load(base_p + offs_k[None, :] * s_k, mask=mask_p[:, None] & mask_k[None, :], other=0)
            b = tl.load(base_q + offs_k[None, :] * s_k, mask=mask_q[:, None] & mask_k[None, :], other=0)
            if BINARY:
                a = a.to(tl.int8, bitcast=True)
                b = b.to(tl.int8, bitcast=True)
            else:
                a = (a != 0).to(tl.int8)
                b = (b != 0).to(tl.int8)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)  # exact 0/1 products, int32 sums
        if MODE == 0:
            ptrs = out_ptr + offs_p[:, None].to(tl.int64) * n + offs_q[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, acc, mask=pair, sem="relaxed")
            else:
                tl.store(ptrs, acc, mask=pair)
        else:
            area_p = tl.load(area_ptr + offs_p, mask=mask_p, other=0.0)
            area_q = tl.load(area_ptr + offs_q, mask=mask_q, other=0.0)
            iou = _iou(acc.to(tl.float64), area_p, area_q)
            # Integer atomics on order-preserving keys: exact, so the result is the same in any order;
            # relaxed: the values are read only after the launch, nothing is ordered around them.
            if MODE == 1:  # iou >= 0: its bits order as it does
                col = tl.max(tl.where(pair, iou, 0.0), axis=0)
                tl.atomic_max(out_ptr + offs_q, col.to(tl.int64, bitcast=True), mask=mask_q, sem="relaxed")
            else:
                sigma = tl.load(sigma_ptr)
                comp = tl.load(comp_ptr + offs_p, mask=mask_p, other=0).to(tl.float64, bitcast=True)
                col = tl.min(tl.where(pair, _ratio(iou, _decay_f(comp, sigma, KERNEL)[:, None], sigma, KERNEL), 1.0),
                             axis=0)
                tl.atomic_min(out_ptr + offs_q, _order_key(col), mask=mask_q, sem="relaxed")


@triton.jit(do_not_specialize=["n", "HW"])
def _matrix_nms_area_kernel(
    masks_ptr,  # [n0, HW] uint8, strides (s_m, s_k), as the tile kernel's
    idx_ptr,  # [n] int64 contiguous: mask index of grouped position p
    area_ptr,  # [n] float64 contiguous: pixel count of each grouped position
    n, HW, s_m, s_k,
    BLOCK_P: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # pixels per step
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < n
    base = masks_ptr + tl.load(idx_ptr + offs_p, mask=mask_p, other=0)[:, None] * s_m
    count = tl.zeros((BLOCK_P,), dtype=tl.int32)
    for k0 in range(0, HW, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(base + offs_k[None, :] * s_k, mask=mask_p[:, None] & (offs_k[None, :] < HW), other=0)
        count += tl.sum((a != 0).to(tl.int32), axis=1)
    tl.store(area_ptr + offs_p, count.to(tl.float64), mask=mask_p)


@triton.jit
def _decay_f(x, sigma, KERNEL: tl.constexpr):
    """f(x) in float64: exp(-sigma x^2) (KERNEL 0, gaussian) or 1 - x (KERNEL 1, linear)."""
    if KERNEL == 0:
        return tl.exp(-sigma * x * x)
    else:
        return 1.0 - x


@triton.jit
def _iou(inter, area_p, area_q):
    """float64 IoU of a tile from its intersections [P, Q] and areas [P], [Q]; 0 where the union is empty."""
    union = area_p[:, None] + area_q[None, :] - inter
    return tl.where(union > 0.0, inter / tl.where(union > 0.0, union, 1.0), 0.0)


@triton.jit
def _ratio(iou, fcomp_p, sigma, KERNEL: tl.constexpr):
    """f(iou_pq) / f(comp_p); 1 (no decay) where f(comp_p) == 0."""
    return tl.where(fcomp_p > 0.0, _decay_f(iou, sigma, KERNEL) / tl.where(fcomp_p > 0.0, fcomp_p, 1.0), 1.0)


@triton.jit
def _order_key(x):
    """int64 key of float64 x that orders as x does: the bits, with a negative x's magnitude bits flipped."""
    b = x.to(tl.int64, bitcast=True)
    return b ^ ((b >> 63) & 0x7FFFFFFFFFFFFFFF)


@triton.jit
def _area(inter_ptr, area_ptr, offs, mask, n, HAS_AREA: tl.constexpr):
    """float64 areas of grouped positions offs: the given ones, or the diagonal inter[p, p]."""
    if HAS_AREA:
        return tl.load(area_ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(inter_ptr + offs.to(tl.int64) * (n + 1), mask=mask, other=0).to(tl.float64)


@triton.jit
def _iou_tile(inter_ptr, area_ptr, start_q, offs_q, area_q, p0, n,
              HAS_AREA: tl.constexpr, BLOCK_P: tl.constexpr):
    """(iou [BLOCK_P, BLOCK_Q] float64, same-label mask p < q) of rows p0 + arange(BLOCK_P)."""
    offs_p = p0 + tl.arange(0, BLOCK_P)
    pair = (offs_p[:, None] >= start_q[None, :]) & (offs_p[:, None] < offs_q[None, :])  # implies p, q < n
    inter = tl.load(inter_ptr + offs_p[:, None].to(tl.int64) * n + offs_q[None, :], mask=pair, other=0)
    inter = inter.to(tl.float64)
    area_p = _area(inter_ptr, area_ptr, offs_p, offs_p < n, n, HAS_AREA)
    return _iou(inter, area_p, area_q), pair, offs_p


@triton.jit(do_not_specialize=["n"])
def _matrix_nms_comp_kernel(
    inter_ptr,  # [n, n] int32 contiguous, strides (n, 1): valid for start[q] <= p <= q
    area_ptr,  # [n] float64 contiguous: areas of the grouped positions (read only when HAS_AREA)
    start_ptr,  # [n] int64 contiguous: first grouped position of p's label
    sigma_ptr,  # [1] float64
    fcomp_ptr,  # [n] float64 contiguous: f(comp_q), comp_q = max over p in [start[q], q) of iou_pq
    n,
    HAS_AREA: tl.constexpr, KERNEL: tl.constexpr,
    BLOCK_P: tl.constexpr,  # rows per step
    BLOCK_Q: tl.constexpr,  # columns per program
):
    pid = tl.program_id(0)  # over cdiv(n, BLOCK_Q)
    q0 = pid * BLOCK_Q
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < n
    start_q = tl.load(start_ptr + offs_q, mask=mask_q, other=n)
    area_q = _area(inter_ptr, area_ptr, offs_q, mask_q, n, HAS_AREA)
    sigma = tl.load(sigma_ptr)
    comp = tl.zeros((BLOCK_Q,), dtype=tl.float64)
    q_last = tl.minimum(q0 + BLOCK_Q, n) - 1
    for p0 in range(tl.load(start_ptr + q0), q_last, BLOCK_P):  # start is nondecreasing
        iou, pair, offs_p = _iou_tile(inter_ptr, area_ptr, start_q, offs_q, area_q, p0, n, HAS_AREA, BLOCK_P)
        comp = tl.maximum(comp, tl.max(tl.where(pair, iou, 0.0), axis=0))
    tl.store(fcomp_ptr + offs_q, _decay_f(comp, sigma, KERNEL), mask=mask_q)


@triton.jit(do_not_specialize=["n"])
def _matrix_nms_decay_kernel(
    inter_ptr,  # [n, n] int32 contiguous, strides (n, 1): valid for start[q] <= p <= q
    area_ptr,  # [n] float64 contiguous (read only when HAS_AREA)
    start_ptr,  # [n] int64 contiguous: first grouped position of p's label
    fcomp_ptr,  # [n] float64 contiguous: f(comp_p)
    perm_ptr,  # [n] int64 contiguous: output position of grouped position q
    sigma_ptr,  # [1] float64
    out_ptr,  # [n] float64 contiguous: out[perm[q]] = decay_q
    n,
    HAS_AREA: tl.constexpr, KERNEL: tl.constexpr,
    BLOCK_P: tl.constexpr,  # rows per step
    BLOCK_Q: tl.constexpr,  # columns per program
):
    pid = tl.program_id(0)  # over cdiv(n, BLOCK_Q)
    q0 = pid * BLOCK_Q
    offs_q = q0 + tl.arange(0, BLOCK_Q)
    mask_q = offs_q < n
    start_q = tl.load(start_ptr + offs_q, mask=mask_q, other=n)
    area_q = _area(inter_ptr, area_ptr, offs_q, mask_q, n, HAS_AREA)
    sigma = tl.load(sigma_ptr)
    decay = tl.full((BLOCK_Q,), 1.0, dtype=tl.float64)
    q_last = tl.minimum(q0 + BLOCK_Q, n) - 1
    for p0 in range(tl.load(start_ptr + q0), q_last, BLOCK_P):
        iou, pair, offs_p = _iou_tile(inter_ptr, area_ptr, start_q, offs_q, area_q, p0, n, HAS_AREA, BLOCK_P)
        den = tl.load(fcomp_ptr + offs_p, mask=offs_p < n, other=1.0)[:, None]
        decay = tl.minimum(decay, tl.min(tl.where(pair, _ratio(iou, den, sigma, KERNEL), 1.0), axis=0))
    dest = tl.load(perm_ptr + offs_q, mask=mask_q, other=0)
    tl.store(out_ptr + dest, decay, mask=mask_q)


@triton.jit
def _unpack_bits_kernel(
    bits_ptr,  # [n0 * words] int64 contiguous: bit b of word w is pixel 64 w + b
    out_ptr,  # [n0 * words * 64] uint8 contiguous: one byte per pixel, 0 or 1
    total_words,
    BLOCK_W: tl.constexpr,  # words per program
):
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = offs_w < total_words
    words = tl.load(bits_ptr + offs_w, mask=mask, other=0)
    shifts = tl.arange(0, 64).to(tl.int64)
    bits = ((words[:, None] >> shifts[None, :]) & 1).to(tl.uint8)  # bit 63: >> keeps the sign, & 1 drops it
    tl.store(out_ptr + offs_w[:, None].to(tl.int64) * 64 + shifts[None, :], bits, mask=mask[:, None])


# ---- launcher (allocates outputs, picks block sizes) --------------------------------------------


def _blocks(n: int, hw: int, device: torch.device, aligned: bool) -> dict[str, int]:
    """Block sizes. The intersection tiles are BLOCK x BLOCK pairs over BLOCK_K pixels of int8 (tl.dot
    needs >= 16 per side; int8 on tensor cores wants K >= 32). ``aligned``: mask rows start on 16-byte
    boundaries and pixels are contiguous, so the tiles load as 16-byte vectors (cp.async, pipelined);
    otherwise every byte has its own address and smaller K steps over 8 warps keep the pointers in
    registers. When the tiles of the upper triangle are too few to fill the GPU, the pixels are split
    over SPLIT_K programs, each keeping >= 8 K steps. The column passes take COL_Q columns per program
    and COL_P rows per step (float64).

    Compiled ahead of time for sm_90a (Triton 3.8, ptxas -v, no GPU run): wgmma s8 for the tiles; no
    register spills (aligned: 138 registers for bool, 184 for uint8 masks, 48 KiB shared memory;
    unaligned: 210 registers); column passes 168 registers, IEEE div.rn.f64; large-n tile passes
    160-253 registers, no spills (bench/triton_sm90_compile.py)."""
    block = 64
    block_k, warps = (128, 4) if aligned else (64, 8)
    tiles = triton.cdiv(n, block)
    tri = tiles * (tiles + 1) // 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(triton.cdiv(2 * sms, tri), triton.cdiv(hw, 8 * block_k)))
    return dict(BLOCK=block, BLOCK_K=block_k, SPLIT_K=split, WARPS=warps, STAGES=3, COL_P=64, COL_Q=32)


def _launch_matrix_nms_decay(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor | None, kernel: str,
                             sigma: float, blocks: dict[str, int] | None = None) -> Tensor:
    """decay [n] float64 of the masks order[0..n) (masks [n0, H, W] bool/uint8, any strides)."""
    n = order.shape[0]
    dev = masks.device
    out = torch.empty((n,), device=dev, dtype=torch.float64)
    if n == 0:
        return out
    # Group the positions by label, score order inside a group.
    lab = labels.index_select(0, order).to(torch.int64)
    lab_sorted, perm = torch.sort(lab, stable=True)
    start = torch.searchsorted(lab_sorted, lab_sorted).contiguous()  # first position of each label
    idx = order.index_select(0, perm).contiguous()
    perm = perm.contiguous()
    _, h, w = masks.shape
    hw = h * w
    flat = (masks.view(torch.uint8) if masks.dtype == torch.bool else masks).flatten(1)  # a view when possible
    # Allocations are >= 16-byte aligned; storage_offset (not data_ptr) also works on fake tensors.
    aligned = flat.stride(1) == 1 and flat.stride(0) % 16 == 0 and flat.storage_offset() % 16 == 0
    bs = blocks or _blocks(n, hw, dev, aligned)
    fused = bs.get("FUSED", n > _FUSED_MIN_N)
    tiles = triton.cdiv(n, bs["BLOCK"])
    split = 1 if fused else bs["SPLIT_K"]
    has_area = mask_area is not None
    k = _KERNELS.index(kernel)
    # 1-element stand-ins keep the signatures for arguments a launch does not read (never an alias of
    # another argument: wrap_triton's functionalisation would see a written input twice).
    area = mask_area.index_select(0, idx).to(torch.float64).contiguous() if has_area \
        else torch.empty((n if fused else 1,), device=dev, dtype=torch.float64)
    sig = torch.full((1,), float(sigma), device=dev, dtype=torch.float64)
    masks_args = (flat, idx, start)
    dims = (n, hw, flat.stride(0), flat.stride(1))
    tile = dict(BINARY=masks.dtype == torch.bool, ATOMIC=split > 1, SPLIT_K=split, BLOCK_P=bs["BLOCK"],
                BLOCK_Q=bs["BLOCK"], BLOCK_K=bs["BLOCK_K"], num_warps=bs["WARPS"], num_stages=bs["STAGES"])
    if fused:
        # O(n) memory: comp, then the decay, straight from the intersection tiles (computed twice).
        if not has_area:
            _kernel(_matrix_nms_area_kernel)[(triton.cdiv(n, bs["COL_P"]),)](
                flat, idx, area, *dims, BLOCK_P=bs["COL_P"], BLOCK_K=bs["BLOCK_K"], num_warps=4)
        comp = torch.zeros((n,), device=dev, dtype=torch.int64)  # the bits of 0.0
        keys = torch.full((n,), _ONE_KEY, device=dev, dtype=torch.int64)  # no decay: 1.0
        unused = torch.empty((1,), device=dev, dtype=torch.int64)
        grid = (tiles, tiles, 1)
        _kernel(_matrix_nms_tile_kernel)[grid](*masks_args, area, unused, sig, comp, *dims, MODE=1, KERNEL=0, **tile)
        _kernel(_matrix_nms_tile_kernel)[grid](*masks_args, area, comp, sig, keys, *dims, MODE=2, KERNEL=k, **tile)
        bits = keys ^ ((keys >> 63) & 0x7FFFFFFFFFFFFFFF)  # _order_key is its own inverse
        return out.index_copy_(0, perm, bits.view(torch.float64))
    inter = (torch.zeros if split > 1 else torch.empty)((n, n), device=dev, dtype=torch.int32)
    stand_in = torch.empty((1,), device=dev, dtype=torch.int64)
    _kernel(_matrix_nms_tile_kernel)[(tiles, tiles, split)](*masks_args, area, stand_in, sig, inter, *dims, MODE=0,
                                                             KERNEL=0, **tile)
    # Without given areas the column passes read the diagonal of inter.
    fcomp = torch.empty((n,), device=dev, dtype=torch.float64)
    grid = (triton.cdiv(n, bs["COL_Q"]),)
    cols = dict(HAS_AREA=has_area, KERNEL=k, BLOCK_P=bs["COL_P"], BLOCK_Q=bs["COL_Q"], num_warps=4)
    _kernel(_matrix_nms_comp_kernel)[grid](inter, area, start, sig, fcomp, n, **cols)
    _kernel(_matrix_nms_decay_kernel)[grid](inter, area, start, fcomp, perm, sig, out, n, **cols)
    return out


# ---- op ----------------------------------------------------------------------------------------


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def _check(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor | None, kernel: str,
           sigma: float) -> None:
    """The checks of the CPU kernel (csrc/ops/matrix_nms.cpp), each naming the argument it rejects."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [n, H, W], got shape {tuple(masks.shape)}")
    if masks.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"masks must be bool or uint8 (threshold float masks first), got {masks.dtype}")
    n0 = masks.shape[0]
    if labels.dim() != 1 or labels.shape[0] != n0:
        raise ValueError(f"labels must be [{n0}] (one per mask), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if order.dim() != 1 or order.dtype != torch.int64 or order.shape[0] > n0:
        raise ValueError(f"order must be a 1-D int64 tensor of at most {n0} indices, got {order.dtype} of shape "
                         f"{tuple(order.shape)}")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {_KERNELS}, got {kernel!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    for name, t in (("labels", labels), ("order", order), ("mask_area", mask_area)):
        if t is not None and t.device != masks.device:
            raise ValueError(f"{name} is on {t.device} but masks are on {masks.device}")
    if mask_area is not None and (mask_area.dim() != 1 or mask_area.shape[0] != n0
                                  or not mask_area.is_floating_point()):
        raise ValueError(f"mask_area must be a floating [{n0}] tensor, got {mask_area.dtype} of shape "
                         f"{tuple(mask_area.shape)}")
    # Device tensors are not checked here: that would sync (index_select still rejects bad indices).
    if order.numel() and order.device.type == "cpu" and not _is_fake(order):
        if int(order.min()) < 0 or int(order.max()) >= n0:
            raise ValueError(f"order must index [0, {n0})")


@torch.library.triton_op("fastseg::matrix_nms_decay_triton", mutates_args=())
def _matrix_nms_decay_triton(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor | None, kernel: str,
                             sigma: float) -> Tensor:
    _check(masks, labels, order, mask_area, kernel, sigma)
    with on_device(masks):
        return _launch_matrix_nms_decay(masks, labels, order, mask_area, kernel, sigma)


def matrix_nms_decay(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor | None, kernel: str,
                     sigma: float) -> Tensor:
    """Matrix NMS decay factors on Triton (the backend of ``fastseg.ops.matrix_nms``; not differentiable).

    Args:
        masks: [n0, H, W] bool or uint8 (a pixel is set where != 0), any strides.
        labels: [n0] integer class of each mask.
        order: [n] int64 indices into the masks, in score order (descending), n <= n0.
        mask_area: [n0] floating areas to use instead of the pixel counts, or None.
        kernel: "gaussian" (f(x) = exp(-sigma x^2)) or "linear" (f(x) = 1 - x).
        sigma: > 0.

    Returns:
        [n] float64: decay[j] of mask order[j] (see the module docstring), equal to the CPU kernel's.

    Example::

        >>> order = torch.sort(scores, descending=True, stable=True).indices
        >>> decay = matrix_nms_decay(masks, labels, order, None, "gaussian", 2.0)  # masks [500, 200, 304]
    """
    return torch.ops.fastseg.matrix_nms_decay_triton(masks, labels, order, mask_area, str(kernel), float(sigma))


@torch.library.triton_op("fastseg::matrix_nms_packed_decay_triton", mutates_args=())
def _matrix_nms_packed_decay_triton(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor, kernel: str,
                                    sigma: float) -> Tensor:
    if masks.dim() != 2 or masks.dtype != torch.int64:
        raise ValueError(f"masks must be int64 [n, words] (bit-packed), got {masks.dtype} of shape "
                         f"{tuple(masks.shape)}")
    n0, words = masks.shape
    with on_device(masks):
        unpacked = torch.empty((n0, 1, words * 64), device=masks.device, dtype=torch.uint8)
        _check(unpacked, labels, order, mask_area, kernel, sigma)
        if n0 * words:
            block = 64
            _kernel(_unpack_bits_kernel)[(triton.cdiv(n0 * words, block),)](masks.contiguous(), unpacked,
                                                                            n0 * words, BLOCK_W=block, num_warps=4)
        return _launch_matrix_nms_decay(unpacked, labels, order, mask_area, kernel, sigma)


def matrix_nms_packed_decay(masks: Tensor, labels: Tensor, order: Tensor, mask_area: Tensor, kernel: str,
                            sigma: float) -> Tensor:
    """:func:`matrix_nms_decay` of bit-packed masks int64 [n0, words] (bit b of word w is pixel 64 w + b) with
    their areas [n0] (required): the backend of ``fastseg.ops.matrix_nms_packed`` on Triton.

    Example::

        >>> decay = matrix_nms_packed_decay(out.masks, labels, order, out.areas, "gaussian", 2.0)
    """
    if mask_area is None:
        raise ValueError("mask_area is required for packed masks")
    return torch.ops.fastseg.matrix_nms_packed_decay_triton(masks, labels, order, mask_area, str(kernel),
                                                            float(sigma))
