"""Triton backend of fastseg::esp_pyramid (ESPNet's pyramid of dilated 3×3 convs + hierarchical sums).

Forward: ``_esp_pyramid_fwd_kernel``. A program owns BLOCK_P pixels of one image and BLOCK_O
channel offsets o; it walks the K branches in order, accumulating each branch's 3×3 dilated
convolution of x as outer products (weights [BLOCK_O] × inputs [BLOCK_P], fp32) and storing branch 0
as is and branch k >= 1 as the running sum of branches 1..k: all branches and the fusion from one
program, each output element written once.

Backward (op ``fastseg::_esp_pyramid_triton_backward``): G_k = sum_{m >= k} grad_m (the reverse
cumulative sum over branches >= 1, by torch in fp32), then ``_esp_pyramid_bwd_input_kernel``
(grad_x as the transposed dilated convolution of G, a gather: no atomics) and
``_esp_pyramid_bwd_weight_kernel`` (a program per weight row, BLOCK_C input channels and fixed
slice of the pixels; partial sums added by torch in a fixed order: deterministic).

Packed layout (as the C++ kernels, ops/common/esp_pyramid.h): branch 0 owns weight rows and output
channels [0, d1), branch k >= 1 owns [d1 + (k - 1) d, d1 + k d).

Dtypes: float32, float16 and bfloat16 on CUDA (fp32 accumulation); float32 under
``TRITON_INTERPRET=1`` on CPU tensors. Launches run on the input's device and current stream.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.ops._autograd import register_esp_pyramid_autograd
from fastseg.triton_kernels._common import check_dtype, kernel, on_device, pow2

__all__ = ["esp_pyramid"]


@triton.jit
def _branch(k, d1, d):
    """(first packed row, rows) of branch k."""
    start = tl.where(k == 0, 0, d1 + (k - 1) * d)
    width = tl.where(k == 0, d1, d)
    return start, width


@triton.jit
def _esp_pyramid_fwd_kernel(
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw) in elements, fp32/fp16/bf16
    w_ptr,  # [D, C, 3, 3] contiguous, dtype of x
    dil_ptr,  # [K] int32 dilation rates
    out_ptr,  # [N, D, H, W] contiguous, dtype of x
    C, H, W, D, d1, d, K,
    sxn, sxc, sxh, sxw,
    BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P = H * W
    tiles = tl.cdiv(P, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    offs_p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_p = offs_p < P
    oh = offs_p // W
    ow = offs_p % W
    x_img = x_ptr + n * sxn
    out_img = out_ptr + n * D * P
    run = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    for k in range(K):
        dil = tl.load(dil_ptr + k)
        start, width = _branch(k, d1, d)
        mask_o = offs_o < width
        rows = start + offs_o
        acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
        for c in range(C):
            for t in tl.static_range(9):
                ih = oh + (t // 3 - 1) * dil
                iw = ow + (t % 3 - 1) * dil
                m = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_img + c * sxc + ih * sxh + iw * sxw, mask=m, other=0.0).to(tl.float32)
                wv = tl.load(w_ptr + (rows * C + c) * 9 + t, mask=mask_o, other=0.0).to(tl.float32)
                acc += wv[:, None] * xv[None, :]
        run += tl.where(k > 0, acc, 0.0)
        val = tl.where(k == 0, acc, run)
        ptrs = out_img + rows[:, None].to(tl.int64) * P + offs_p[None, :]
        tl.store(ptrs, val.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_p[None, :])


@triton.jit
def _esp_pyramid_bwd_input_kernel(
    g_ptr,  # [N, D, H, W] fp32 contiguous: G, the reverse cumulative sums of the grad
    w_ptr,  # [D, C, 3, 3] contiguous
    dil_ptr,  # [K] int32
    gx_ptr,  # [N, C, H, W] fp32 contiguous
    C, H, W, D, d1, d, K,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    P = H * W
    tiles = tl.cdiv(P, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    offs_p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    oh = offs_p // W
    ow = offs_p % W
    g_img = g_ptr + n * D * P
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for k in range(K):
        dil = tl.load(dil_ptr + k)
        start, width = _branch(k, d1, d)
        for o in range(width):
            r = start + o
            for t in tl.static_range(9):
                # output pixel (oh - (i-1) dil, ow - (j-1) dil) reads this input pixel through tap t
                sh = oh - (t // 3 - 1) * dil
                sw = ow - (t % 3 - 1) * dil
                m = mask_p & (sh >= 0) & (sh < H) & (sw >= 0) & (sw < W)
                gv = tl.load(g_img + r.to(tl.int64) * P + sh * W + sw, mask=m, other=0.0)
                wv = tl.load(w_ptr + (r * C + offs_c) * 9 + t, mask=mask_c, other=0.0).to(tl.float32)
                acc += wv[:, None] * gv[None, :]
    ptrs = gx_ptr + (n * C + offs_c[:, None]) * P + offs_p[None, :]
    tl.store(ptrs, acc, mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def _esp_pyramid_bwd_weight_kernel(
    g_ptr,  # [N, D, H, W] fp32 contiguous (G)
    x_ptr,  # [N, C, H, W], strides (sxn, sxc, sxh, sxw)
    dil_ptr,  # [K] int32
    part_ptr,  # [split, D, C, 9] fp32: partial sums of this program's pixel chunk
    N, C, H, W, D, d1, d, chunk,
    sxn, sxc, sxh, sxw,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    r = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    mask_c = offs_c < C
    k = tl.where(r < d1, 0, 1 + (r - d1) // tl.maximum(d, 1))
    dil = tl.load(dil_ptr + k)
    P = H * W
    tiles = N * tl.cdiv(P, BLOCK_P)
    tiles_p = tl.cdiv(P, BLOCK_P)
    for t in tl.static_range(9):
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for q in range(split * chunk, tl.minimum(split * chunk + chunk, tiles)):
            n = (q // tiles_p).to(tl.int64)
            offs_p = (q % tiles_p) * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            oh = offs_p // W
            ow = offs_p % W
            gv = tl.load(g_ptr + (n * D + r) * P + offs_p, mask=mask_p, other=0.0)
            ih = oh + (t // 3 - 1) * dil
            iw = ow + (t % 3 - 1) * dil
            m = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + n * sxn + offs_c[:, None] * sxc + (ih * sxh + iw * sxw)[None, :],
                         mask=mask_c[:, None] & m[None, :], other=0.0).to(tl.float32)
            acc += xv * gv[None, :]
        total = tl.sum(acc, axis=1)
        tl.store(part_ptr + ((split * D + r) * C + offs_c) * 9 + t, total, mask=mask_c)


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------

def _geometry(x: Tensor, weight: Tensor, first: int, dilations: list[int]) -> tuple[int, int, int]:
    k = len(dilations)
    d = (weight.shape[0] - first) // (k - 1) if k > 1 else 0
    return first, d, k


def _launch_fwd(x: Tensor, weight: Tensor, first: int, dilations: list[int]) -> Tensor:
    N, C, H, W = x.shape
    D = weight.shape[0]
    d1, d, K = _geometry(x, weight, first, dilations)
    out = torch.empty((N, D, H, W), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    w = weight.contiguous()
    dil = torch.tensor(dilations, dtype=torch.int32, device=x.device)
    # Two [BLOCK_O, BLOCK_P] fp32 accumulators plus nine taps' loads in flight: 1024 elements keep to
    # ~140 registers at 4 warps on sm_90a (ptxas -v; 4096 spilled at 255).
    BLOCK_O = pow2(max(d1, d), 1, 32)
    BLOCK_P = pow2(H * W, 16, 1024 // BLOCK_O)
    grid = (N * triton.cdiv(H * W, BLOCK_P), triton.cdiv(max(d1, d), BLOCK_O))
    kernel(_esp_pyramid_fwd_kernel)[grid](
        x, w, dil, out,
        C, H, W, D, d1, d, K,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        BLOCK_O=BLOCK_O, BLOCK_P=BLOCK_P, num_warps=4,
    )
    return out


def _grad_sums(grad: Tensor, first: int, K: int) -> Tensor:
    """G: branch 0's grad, and for branch k >= 1 the sum of the grads of branches k..K-1 (fp32)."""
    G = grad.to(torch.float32).contiguous().clone()
    if K > 1:
        N, _, H, W = G.shape
        rest = G[:, first:].view(N, K - 1, -1, H, W)
        rest.copy_(rest.flip(1).cumsum(1).flip(1))
    return G


def _backward_fp32(grad_out: Tensor, x: Tensor, weight: Tensor, first: int,
                   dilations: list[int]) -> tuple[Tensor, Tensor]:
    """Grads of (x, weight) in fp32 (defined before the op so that triton_op finds its kernels)."""
    N, C, H, W = x.shape
    D = weight.shape[0]
    d1, d, K = _geometry(x, weight, first, dilations)
    gx = torch.zeros((N, C, H, W), device=x.device, dtype=torch.float32)
    if N * H * W == 0 or C == 0:
        return gx, torch.zeros((D, C, 3, 3), device=x.device, dtype=torch.float32)
    G = _grad_sums(grad_out, first, K)
    w = weight.contiguous()
    dil = torch.tensor(dilations, dtype=torch.int32, device=x.device)
    P = H * W
    BLOCK_C = pow2(C, 1, 32)
    # 1024 accumulator elements with nine taps' loads in flight: ~110 registers on sm_90a (2048: 248)
    BLOCK_P = pow2(P, 16, 1024 // BLOCK_C)
    kernel(_esp_pyramid_bwd_input_kernel)[(N * triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))](
        G, w, dil, gx,
        C, H, W, D, d1, d, K,
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, num_warps=4,
    )
    # The N * P reduction in fixed runs of pixel tiles (enough programs to fill a GPU), added in order.
    BLOCK_PW = pow2(P, 16, 4096 // BLOCK_C)
    tiles = N * triton.cdiv(P, BLOCK_PW)
    split = max(1, min(triton.cdiv(tiles, 8), triton.cdiv(2048, D * triton.cdiv(C, BLOCK_C))))
    chunk = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, chunk)
    part = torch.empty((split, D, C, 9), device=x.device, dtype=torch.float32)
    kernel(_esp_pyramid_bwd_weight_kernel)[(D, triton.cdiv(C, BLOCK_C), split)](
        G, x, dil, part,
        N, C, H, W, D, d1, d, chunk,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_PW, num_warps=4,
    )
    return gx, part.sum(0).view(D, C, 3, 3)


# ---- ops ---------------------------------------------------------------------------------------


@torch.library.triton_op("fastseg::esp_pyramid_triton", mutates_args=())
def _esp_pyramid_triton(x: Tensor, weight: Tensor, first_channels: int, dilations: list[int]) -> Tensor:
    check_dtype("esp_pyramid", "x", x)
    with on_device(x):
        return _launch_fwd(x, weight, first_channels, dilations)


@torch.library.triton_op("fastseg::_esp_pyramid_triton_backward", mutates_args=())
def _esp_pyramid_triton_backward(grad_out: Tensor, x: Tensor, weight: Tensor, first_channels: int,
                                 dilations: list[int]) -> tuple[Tensor, Tensor]:
    """Grads of (x, weight), in their dtypes; computed in fp32."""
    check_dtype("esp_pyramid", "x", x)
    with on_device(x), torch.autocast(device_type=x.device.type, enabled=False):
        gx, gw = _backward_fp32(grad_out, x, weight, first_channels, dilations)
    return gx.to(x.dtype), gw.to(weight.dtype)


register_esp_pyramid_autograd("fastseg::esp_pyramid_triton", torch.ops.fastseg._esp_pyramid_triton_backward)


def esp_pyramid(x: Tensor, weight: Tensor, first_channels: int, dilations: list[int]) -> Tensor:
    """ESP pyramid on Triton: x [N, C, H, W] (any strides), weight [D, C, 3, 3] packed (branch 0 has
    ``first_channels`` rows, the others equal shares) -> [N, D, H, W] contiguous, dtype of x.
    Positional form of ``fastseg.ops.esp_pyramid`` (which checks the arguments). Under CUDA autocast
    x and the weight run in the autocast dtype (as the C++ op does).

    Example::

        >>> out = esp_pyramid(x, torch.cat(weights), weights[0].shape[0], [1, 2, 4, 8, 16])
    """
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dt), weight.to(dt)
    return torch.ops.fastseg.esp_pyramid_triton(x, weight, int(first_channels), [int(v) for v in dilations])
