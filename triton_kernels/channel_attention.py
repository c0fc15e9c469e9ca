"""Triton backend of DANet's channel attention (CAM).

x [B, C, H, W], X = x viewed as [B, C, N] (N = H * W): E = X X^T [B, C, C],
A = softmax(rowmax(E) - E) = softmax(-E) (made stable by subtracting each row's minimum of E),
out = A X [B, C, H, W]. E is only C x C (C = 512 in DANet) and is materialised in fp32.

Forward, three kernels:

* ``_channel_attention_gram_kernel``: E = P Q^T over the long N dimension (here P = Q = x, so only
  the tiles on and above the diagonal are computed, each stored twice);
* ``_channel_attention_softmax_kernel``: A = softmax(-E) row by row (online row minimum and sum,
  then one normalising pass), in place;
* ``_channel_attention_matmul_kernel``: out = A X (optionally + A2 X2), a [C, C] x [C, N] product.

Backward (op ``fastseg::_channel_attention_triton_backward``, recomputes A from x):
dA = dOut X^T (the Gram kernel with P = dOut, Q = x), dS = A * (dA - rowsum(dA * A)) and
M = dE + dE^T = -(dS + dS^T) in torch (C x C, fp32), then dX = A^T dOut + M X in one launch of the
product kernel (A^T is a strided view: no copy). No atomics: deterministic.

Dtypes: float32, float16 and bfloat16 on CUDA. The Gram products take fp16/bf16 operands as they
are (fp32 accumulation), fp32 operands with exact fp32 dots; the C x C factors stay fp32, and the
products with them use exact fp32 dots for fp32 x and TF32 otherwise (fp32 range, 10-bit mantissa:
no fp16 overflow of the backward's M, better than rounding A to bf16). float32 under
``TRITON_INTERPRET=1`` on CPU tensors.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fastseg.triton_kernels._common import check_dtype, hw_offsets, interpreting, pow2

__all__ = ["channel_attention"]

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _channel_attention_gram_kernel(
    p_ptr,  # [B, C, H, W], strides (spb, spc, sph, spw) in elements, any memory format
    q_ptr,  # [B, C, H, W], strides (sqb, sqc, sqh, sqw); dtype of p (the same tensor when SYMMETRIC)
    e_ptr,  # [B, C, C] fp32 contiguous, strides (C*C, C, 1): e[b, i, j] = sum_n p[b, i, n] q[b, j, n]
    C, W, N,
    spb, spc, sph, spw,
    sqb, sqc, sqh, sqw,
    SYMMETRIC: tl.constexpr,  # p is q: compute the tiles with tile_j >= tile_i, store each twice
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,  # E tile (BLOCK_I == BLOCK_J when SYMMETRIC)
    BLOCK_K: tl.constexpr,  # positions per step
):
    pid_i = tl.program_id(0)  # over B * cdiv(C, BLOCK_I)
    pid_j = tl.program_id(1)  # over cdiv(C, BLOCK_J)
    tiles = tl.cdiv(C, BLOCK_I)
    b = (pid_i // tiles).to(tl.int64)
    tile_i = pid_i % tiles
    offs_i = tile_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < C
    mask_j = offs_j < C
    if SYMMETRIC:
        keep = pid_j >= tile_i  # below the diagonal: the mirror tile stores this one
    else:
        keep = pid_j >= 0
    n_end = tl.where(keep, N, 0)

    p_base = p_ptr + b * spb + offs_i[:, None] * spc  # [BLOCK_I, 1]
    q_base = q_ptr + b * sqb + offs_j[None, :] * sqc  # [1, BLOCK_J]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, n_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < N
        p = tl.load(p_base + hw_offsets(offs_k, W, sph, spw)[None, :],
                    mask=mask_i[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_I, BLOCK_K]
        qt = tl.load(q_base + hw_offsets(offs_k, W, sqh, sqw)[:, None],
                     mask=mask_k[:, None] & mask_j[None, :], other=0.0)  # [BLOCK_K, BLOCK_J]
        if IEEE:
            acc = tl.dot(p, qt, acc, input_precision="ieee")
        else:
            acc = tl.dot(p, qt, acc)

    e_base = e_ptr + b * C * C
    mask = mask_i[:, None] & mask_j[None, :] & keep
    tl.store(e_base + offs_i[:, None] * C + offs_j[None, :], acc, mask=mask)
    if SYMMETRIC:
        # The mirror tile E[j, i] = E[i, j]^T (the diagonal tile writes itself twice, same values).
        tl.store(e_base + offs_j[None, :] * C + offs_i[:, None], acc, mask=mask)


@triton.jit
def _channel_attention_softmax_kernel(
    e_ptr,  # [B, C, C] fp32 contiguous, strides (C*C, C, 1): energies
    a_ptr,  # [B, C, C] fp32 contiguous, strides (C*C, C, 1): softmax(-E) by rows; may be e_ptr (in place)
    R, C,  # R = B * C rows of length C
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_C: tl.constexpr,  # columns per step
):
    pid = tl.program_id(0)  # over cdiv(R, BLOCK_R)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask_r = rows < R
    e_rows = e_ptr + rows[:, None] * C  # [BLOCK_R, 1]
    # Pass 1: running row minimum m and l = sum_j exp(m - e_j).
    m = tl.full((BLOCK_R,), float("inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_R,), dtype=tl.float32)  # noqa: E741
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (offs < C)[None, :]
        e = tl.load(e_rows + offs[None, :], mask=mask, other=float("inf"))
        m_new = tl.minimum(m, tl.min(e, axis=1))
        m_new = tl.where(mask_r, m_new, 0.0)  # padded rows: keep the arithmetic finite
        l = l * tl.exp(m_new - m) + tl.sum(tl.exp(m_new[:, None] - e), axis=1)  # noqa: E741
        m = m_new
    inv = 1.0 / tl.where(mask_r, l, 1.0)
    # Pass 2: normalise.
    a_rows = a_ptr + rows[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = mask_r[:, None] & (offs < C)[None, :]
        e = tl.load(e_rows + offs[None, :], mask=mask, other=float("inf"))
        tl.store(a_rows + offs[None, :], tl.exp(m[:, None] - e) * inv[:, None], mask=mask)


@triton.jit
def _channel_attention_matmul_kernel(
    l_ptr,  # [B, C, C] fp32, strides (slb, sli, slk): left factor (A, or A^T as a strided view)
    r_ptr,  # [B, C, H, W], strides (srb, src, srh, srw), any memory format
    l2_ptr,  # [B, C, C] fp32, strides (sl2b, sl2i, sl2k): second left factor (read only when TWO)
    r2_ptr,  # [B, C, H, W], strides (sr2b, sr2c, sr2h, sr2w); dtype of r (read only when TWO)
    out_ptr,  # [B, C, H, W] contiguous, strides (C*N, N, W, 1): L R (+ L2 R2)
    C, W, N,
    slb, sli, slk,
    srb, src, srh, srw,
    sl2b, sl2i, sl2k,
    sr2b, sr2c, sr2h, sr2w,
    TWO: tl.constexpr,  # add the second product
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots; otherwise TF32 with r upcast to fp32
    BLOCK_I: tl.constexpr,  # output channels per program
    BLOCK_J: tl.constexpr,  # positions per program
    BLOCK_K: tl.constexpr,  # reduction channels per step
):
    pid_j = tl.program_id(0)  # over B * cdiv(N, BLOCK_J)
    pid_i = tl.program_id(1)  # over cdiv(C, BLOCK_I)
    tiles = tl.cdiv(N, BLOCK_J)
    b = (pid_j // tiles).to(tl.int64)
    offs_j = (pid_j % tiles) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C

    l_base = l_ptr + b * slb + offs_i[:, None] * sli  # [BLOCK_I, 1]
    r_base = r_ptr + b * srb + hw_offsets(offs_j, W, srh, srw)[None, :]  # [1, BLOCK_J]
    l2_base = l2_ptr + b * sl2b + offs_i[:, None] * sl2i
    r2_base = r2_ptr + b * sr2b + hw_offsets(offs_j, W, sr2h, sr2w)[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        lt = tl.load(l_base + offs_k[None, :] * slk, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        rt = tl.load(r_base + offs_k[:, None] * src, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(lt, rt, acc, input_precision="ieee")
        else:
            acc = tl.dot(lt, rt.to(tl.float32), acc, input_precision="tf32")
        if TWO:
            lt2 = tl.load(l2_base + offs_k[None, :] * sl2k, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            rt2 = tl.load(r2_base + offs_k[:, None] * sr2c, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(lt2, rt2, acc, input_precision="ieee")
            else:
                acc = tl.dot(lt2, rt2.to(tl.float32), acc, input_precision="tf32")

    out_ptrs = out_ptr + b * C * N + offs_i[:, None] * N + offs_j[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


def _blocks(C: int, N: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and launch settings of all CAM kernels (tl.dot needs every dimension >= 16 on a
    GPU; exact fp32 dots run on the CUDA cores, so fp32 gets smaller tiles).

    GRAM: E tile GRAM x GRAM, GRAM_K positions per step; MM_I x MM_J output tile of the product,
    MM_K channels per step; SM_R rows x SM_C columns per softmax step. Checked with ptxas for sm_90
    (Triton 3.8): no register spills; at most 104 KiB of shared memory (the two-term TF32 product)."""
    if dtype == torch.float32:
        return dict(GRAM=pow2(C, 16, 64), GRAM_K=pow2(N, 16, 32), GRAM_WARPS=8, GRAM_STAGES=2,
                    MM_I=pow2(C, 16, 64), MM_J=pow2(N, 16, 64), MM_K=pow2(C, 16, 16),
                    MM_WARPS=4, MM_STAGES=2, SM_R=4, SM_C=pow2(C, 16, 512))
    return dict(GRAM=pow2(C, 16, 64), GRAM_K=pow2(N, 16, 64), GRAM_WARPS=8, GRAM_STAGES=3,
                MM_I=pow2(C, 16, 128), MM_J=pow2(N, 16, 64), MM_K=pow2(C, 16, 32),
                MM_WARPS=8, MM_STAGES=3, SM_R=4, SM_C=pow2(C, 16, 512))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _launch_gram(p: Tensor, q: Tensor, bs: dict[str, int]) -> Tensor:
    """E [B, C, C] fp32 with E[b, i, j] = sum_n p[b, i, n] q[b, j, n]; p, q [B, C, H, W], any strides."""
    B, C, H, W = p.shape
    N = H * W
    if B * C == 0:
        return torch.empty((B, C, C), device=p.device, dtype=torch.float32)
    if N == 0:
        return torch.zeros((B, C, C), device=p.device, dtype=torch.float32)
    e = torch.empty((B, C, C), device=p.device, dtype=torch.float32)
    grid = (B * triton.cdiv(C, bs["GRAM"]), triton.cdiv(C, bs["GRAM"]))
    kernel = _channel_attention_gram_kernel if interpreting() else wrap_triton(_channel_attention_gram_kernel)
    kernel[grid](
        p, q, e,
        C, W, N,
        *_strides(p), *_strides(q),
        SYMMETRIC=p is q, IEEE=p.dtype == torch.float32,
        BLOCK_I=bs["GRAM"], BLOCK_J=bs["GRAM"], BLOCK_K=bs["GRAM_K"],
        num_warps=bs["GRAM_WARPS"], num_stages=bs["GRAM_STAGES"],
    )
    return e


def _launch_softmax_(e: Tensor, bs: dict[str, int]) -> Tensor:
    """softmax(-E) over the last dim of E [B, C, C] fp32 contiguous, in place; returns E."""
    B, C, _ = e.shape
    if e.numel() == 0:
        return e
    R = B * C
    kernel = _channel_attention_softmax_kernel if interpreting() else wrap_triton(_channel_attention_softmax_kernel)
    kernel[(triton.cdiv(R, bs["SM_R"]),)](
        e, e, R, C, BLOCK_R=bs["SM_R"], BLOCK_C=bs["SM_C"], num_warps=4,
    )
    return e


def _launch_matmul(lhs: Tensor, rhs: Tensor, bs: dict[str, int], lhs2: Tensor | None = None,
                   rhs2: Tensor | None = None) -> Tensor:
    """lhs @ rhs (+ lhs2 @ rhs2) -> [B, C, H, W] contiguous in rhs's dtype; lhs, lhs2 [B, C, C] fp32
    (any strides), rhs, rhs2 [B, C, H, W] (any strides)."""
    B, C, H, W = rhs.shape
    N = H * W
    out = torch.empty((B, C, H, W), device=rhs.device, dtype=rhs.dtype)
    if out.numel() == 0:
        return out
    two = lhs2 is not None
    if not two:
        lhs2, rhs2 = lhs, rhs  # stand-ins, never read
    grid = (B * triton.cdiv(N, bs["MM_J"]), triton.cdiv(C, bs["MM_I"]))
    kernel = _channel_attention_matmul_kernel if interpreting() else wrap_triton(_channel_attention_matmul_kernel)
    kernel[grid](
        lhs, rhs, lhs2, rhs2, out,
        C, W, N,
        *_strides(lhs), *_strides(rhs), *_strides(lhs2), *_strides(rhs2),
        TWO=two, IEEE=rhs.dtype == torch.float32,
        BLOCK_I=bs["MM_I"], BLOCK_J=bs["MM_J"], BLOCK_K=bs["MM_K"],
        num_warps=bs["MM_WARPS"], num_stages=bs["MM_STAGES"],
    )
    return out


def _attention_matrix(x: Tensor, bs: dict[str, int]) -> Tensor:
    """A = softmax(rowmax(E) - E) [B, C, C] fp32, E = X X^T."""
    return _launch_softmax_(_launch_gram(x, x, bs), bs)


def _launch_channel_attention_fwd(x: Tensor, blocks: dict[str, int] | None = None) -> Tensor:
    B, C, H, W = x.shape
    if x.numel() == 0:
        return torch.empty((B, C, H, W), device=x.device, dtype=x.dtype)
    bs = blocks or _blocks(C, H * W, x.dtype)
    return _launch_matmul(_attention_matrix(x, bs), x, bs)


def _launch_channel_attention_bwd(grad_out: Tensor, x: Tensor, blocks: dict[str, int] | None = None) -> Tensor:
    B, C, H, W = x.shape
    if x.numel() == 0:
        return torch.zeros((B, C, H, W), device=x.device, dtype=x.dtype)
    bs = blocks or _blocks(C, H * W, x.dtype)
    a = _attention_matrix(x, bs)
    da = _launch_gram(grad_out, x, bs)  # dA = dOut X^T
    ds = a * (da - (da * a).sum(dim=-1, keepdim=True))  # softmax backward (C x C, fp32)
    m = -(ds + ds.transpose(1, 2))  # dE + dE^T, with dE = -dS
    return _launch_matmul(a.transpose(1, 2), grad_out, bs, m, x)  # A^T dOut + (dE + dE^T) X


# ---- ops ---------------------------------------------------------------------------------------


def _check(x: Tensor) -> None:
    check_dtype("channel_attention", "x", x)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got shape {tuple(x.shape)}")


@torch.library.triton_op("fastseg::channel_attention_triton", mutates_args=())
def _channel_attention_triton(x: Tensor) -> Tensor:
    _check(x)
    return _launch_channel_attention_fwd(x)


@torch.library.triton_op("fastseg::_channel_attention_triton_backward", mutates_args=())
def _channel_attention_triton_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad of x for out = channel_attention(x) (A recomputed from x)."""
    _check(x)
    # fp32 C x C algebra, even if the caller runs backward inside an autocast region.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _launch_channel_attention_bwd(grad_out.to(x.dtype), x)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.fastseg._channel_attention_triton_backward(grad_out, x)


torch.library.register_autograd("fastseg::channel_attention_triton", _backward, setup_context=_setup_context)


def channel_attention(x: Tensor) -> Tensor:
    """DANet channel attention on Triton: E = X X^T (C x C, fp32), A = softmax(rowmax(E) - E),
    out = A X.

    Args:
        x: [B, C, H, W], any strides; float32, float16 or bfloat16 (float32 under the interpreter).

    Returns:
        [B, C, H, W] contiguous, dtype of x. Under CUDA autocast, x runs in the autocast dtype.

    Example::

        >>> out = channel_attention(torch.randn(2, 64, 17, 19, device="cuda"))
    """
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x = x.to(torch.get_autocast_dtype("cuda"))
    return torch.ops.fastseg.channel_attention_triton(x)
