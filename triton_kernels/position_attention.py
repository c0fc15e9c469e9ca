"""Triton backend of DANet's position attention (PAM), flash-attention style.

q, k [B, Ck, H, W], v [B, C, H, W], N = H * W. energy[i, j] = sum_c q[c, i] k[c, j] (no 1/sqrt(d)
scaling), A = softmax over the keys j, out[c, i] = sum_j v[c, j] A[i, j]. The N x N matrix never
exists in memory.

Forward, ``_position_attention_fwd_kernel``: a program owns BLOCK_M queries of one image and
BLOCK_C value channels; it walks the keys BLOCK_N at a time with an online softmax and
fp32 accumulators, and writes out and lse [B, N] fp32 (the natural log-sum-exp of each query's
energies, kept for the backward). The key width Ck (any, 1 to 64 and more) is padded to a power of
two >= 16 with masks; the value width C (up to 512 and more) is cut into BLOCK_C chunks over
programs, each of which recomputes the (cheap, Ck-wide) energies.

Backward (op ``fastseg::_position_attention_triton_backward``), flash-attention-2 style, with
P = exp(S - lse) recomputed and no atomics (deterministic):

* ``_position_attention_bwd_preprocess_kernel``: delta[i] = sum_c dO[c, i] O[c, i];
* ``_position_attention_bwd_dkdv_kernel``: a program per key block loops over the query blocks:
  dV[c, j] = sum_i P[i, j] dO[c, i], and dK[:, j] = sum_i dS[i, j] q[:, i] with
  dS = P * (dP - delta), dP[i, j] = sum_c dO[c, i] v[c, j] (an inner loop over C chunks). When C fits
  one chunk both come from one launch; otherwise dV is split over programs by C chunk (one launch)
  and dK gets its own launch;
* ``_position_attention_bwd_dq_kernel``: a program per query block loops over the key blocks:
  dQ[:, i] = sum_j dS[i, j] k[:, j].

Dtypes: float32, float16 and bfloat16 on CUDA (fp32 accumulation; exact fp32 ``tl.dot`` for fp32
inputs, fp16/bf16 operands as they are, with P and dS rounded to the input dtype for their dots as in
flash attention); float32 under ``TRITON_INTERPRET=1`` on CPU tensors.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from fastseg.triton_kernels._common import check_dtype, hw_offsets, interpreting, pow2

__all__ = ["position_attention"]

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. IEEE: fp32 operands, exact fp32 products (no TF32).
    Otherwise ``a`` (an fp32 block: P or dS, or already b's dtype) is rounded to b's dtype."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _position_attention_fwd_kernel(
    q_ptr,  # [B, Ck, H, W], strides (sqb, sqc, sqh, sqw) in elements, any memory format
    k_ptr,  # [B, Ck, H, W], strides (skb, skc, skh, skw); dtype of q
    v_ptr,  # [B, C, H, W], strides (svb, svc, svh, svw); dtype of q
    out_ptr,  # [B, C, H, W] contiguous, strides (C*N, N, W, 1); dtype of v
    lse_ptr,  # [B, N] fp32 contiguous, strides (N, 1): natural log-sum-exp of each query's energies
    Ck, C, W, N,
    sqb, sqc, sqh, sqw,
    skb, skc, skh, skw,
    svb, svc, svh, svw,
    IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # Ck padded to a power of two >= 16
    BLOCK_C: tl.constexpr,  # value channels per program
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    pid_c = tl.program_id(1)  # over max(1, cdiv(C, BLOCK_C))
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Ck
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    # q block [BLOCK_M, BLOCK_D]; padded rows / columns are zero.
    q = tl.load(q_ptr + b * sqb + hw_offsets(offs_m, W, sqh, sqw)[:, None] + offs_d[None, :] * sqc,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * skb + offs_d[:, None] * skc  # [BLOCK_D, 1]
    v_base = v_ptr + b * svb + offs_c[None, :] * svc  # [1, BLOCK_C]

    # Energies stay in natural units and exp() sees s - max: the rounding of the exponent is relative
    # to that small difference, not to the energy (hundreds with std-3 inputs, Ck = 64).
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the energies
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt = tl.load(k_base + hw_offsets(offs_n, W, skh, skw)[None, :],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every key block holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + hw_offsets(offs_n, W, svh, svw)[:, None],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        acc = _mma(p, vt, acc * alpha[:, None], IEEE)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + b * C * N + offs_c[None, :] * N + offs_m[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + b * N + offs_m, lse, mask=mask_m & (pid_c == 0))


@triton.jit
def _position_attention_bwd_preprocess_kernel(
    o_ptr,  # [B, C, H, W], strides (sob, soc, soh, sow): the forward's out
    do_ptr,  # [B, C, H, W], strides (sdb, sdc, sdh, sdw): grad of out
    delta_ptr,  # [B, N] fp32 contiguous, strides (N, 1): delta[i] = sum_c dO[c, i] O[c, i]
    C, W, N,
    sob, soc, soh, sow,
    sdb, sdc, sdh, sdw,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    o_base = o_ptr + b * sob + hw_offsets(offs_m, W, soh, sow)[None, :]  # [1, BLOCK_M]
    do_base = do_ptr + b * sdb + hw_offsets(offs_m, W, sdh, sdw)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < C)[:, None] & mask_m[None, :]
        o = tl.load(o_base + offs_c[:, None] * soc, mask=mask, other=0.0)
        do = tl.load(do_base + offs_c[:, None] * sdc, mask=mask, other=0.0)
        acc += o.to(tl.float32) * do.to(tl.float32)
    tl.store(delta_ptr + b * N + offs_m, tl.sum(acc, axis=0), mask=mask_m)


@triton.jit
def _position_attention_bwd_dkdv_kernel(
    q_ptr,  # [B, Ck, H, W], strides (sqb, sqc, sqh, sqw)
    k_ptr,  # [B, Ck, H, W], strides (skb, skc, skh, skw)
    v_ptr,  # [B, C, H, W], strides (svb, svc, svh, svw) (read only when DK)
    do_ptr,  # [B, C, H, W], strides (sdb, sdc, sdh, sdw): grad of out, dtype of v
    lse_ptr,  # [B, N] fp32 contiguous, strides (N, 1)
    delta_ptr,  # [B, N] fp32 contiguous, strides (N, 1) (read only when DK)
    dk_ptr,  # [B, Ck, H, W] contiguous, strides (Ck*N, N, W, 1); dtype of k (written only when DK)
    dv_ptr,  # [B, C, H, W] contiguous, strides (C*N, N, W, 1); dtype of v (written only when DV)
    Ck, C, W, N,
    sqb, sqc, sqh, sqw,
    skb, skc, skh, skw,
    svb, svc, svh, svw,
    sdb, sdc, sdh, sdw,
    DK: tl.constexpr,  # compute dK (needs dP over all C: an inner loop over C chunks)
    DV: tl.constexpr,  # compute dV for this program's C chunk
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # Ck padded to a power of two >= 16
    BLOCK_C: tl.constexpr,  # value channels per chunk
):
    pid_n = tl.program_id(0)  # over B * cdiv(N, BLOCK_N)
    pid_c = tl.program_id(1)  # over cdiv(C, BLOCK_C) when DV and not DK, else 1
    tiles = tl.cdiv(N, BLOCK_N)
    b = (pid_n // tiles).to(tl.int64)
    offs_n = (pid_n % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Ck
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # this program's dV chunk
    mask_c = offs_c < C

    # This program's keys as rows: k^T block [BLOCK_N, BLOCK_D].
    kt = tl.load(k_ptr + b * skb + hw_offsets(offs_n, W, skh, skw)[:, None] + offs_d[None, :] * skc,
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    hw_v = hw_offsets(offs_n, W, svh, svw)
    q_base = q_ptr + b * sqb + offs_d[:, None] * sqc  # [BLOCK_D, 1]
    do_base = do_ptr + b * sdb
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        hw_do = hw_offsets(offs_m, W, sdh, sdw)
        qt = tl.load(q_base + hw_offsets(offs_m, W, sqh, sqw)[None, :],
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_D, BLOCK_M]
        st = _mma(kt, qt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), IEEE)  # S^T
        lse = tl.load(lse_ptr + b * N + offs_m, mask=mask_m, other=0.0)
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)  # padded queries add nothing
        if DV:
            do = tl.load(do_base + hw_do[:, None] + offs_c[None, :] * sdc,
                         mask=mask_m[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_M, BLOCK_C]
            dv = _mma(pt, do, dv, IEEE)
        if DK:
            dpt = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # dP^T
            for c0 in range(0, C, BLOCK_C):
                offs_cc = c0 + tl.arange(0, BLOCK_C)
                mask_cc = offs_cc < C
                vt = tl.load(v_ptr + b * svb + hw_v[:, None] + offs_cc[None, :] * svc,
                             mask=mask_n[:, None] & mask_cc[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
                dot_ = tl.load(do_base + hw_do[None, :] + offs_cc[:, None] * sdc,
                               mask=mask_cc[:, None] & mask_m[None, :], other=0.0)  # [BLOCK_C, BLOCK_M]
                dpt = _mma(vt, dot_, dpt, IEEE)
            delta = tl.load(delta_ptr + b * N + offs_m, mask=mask_m, other=0.0)
            dst = pt * (dpt - delta[None, :])  # dS^T [BLOCK_N, BLOCK_M]
            dk = _mma(dst, tl.trans(qt), dk, IEEE)

    if DK:
        dk_ptrs = dk_ptr + b * Ck * N + offs_d[None, :] * N + offs_n[:, None]
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    if DV:
        dv_ptrs = dv_ptr + b * C * N + offs_c[None, :] * N + offs_n[:, None]
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _position_attention_bwd_dq_kernel(
    q_ptr,  # [B, Ck, H, W], strides (sqb, sqc, sqh, sqw)
    k_ptr,  # [B, Ck, H, W], strides (skb, skc, skh, skw)
    v_ptr,  # [B, C, H, W], strides (svb, svc, svh, svw)
    do_ptr,  # [B, C, H, W], strides (sdb, sdc, sdh, sdw): grad of out, dtype of v
    lse_ptr,  # [B, N] fp32 contiguous, strides (N, 1)
    delta_ptr,  # [B, N] fp32 contiguous, strides (N, 1)
    dq_ptr,  # [B, Ck, H, W] contiguous, strides (Ck*N, N, W, 1); dtype of q
    Ck, C, W, N,
    sqb, sqc, sqh, sqw,
    skb, skc, skh, skw,
    svb, svc, svh, svw,
    sdb, sdc, sdh, sdw,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # Ck padded to a power of two >= 16
    BLOCK_C: tl.constexpr,  # value channels per chunk of the dP loop
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < Ck

    q = tl.load(q_ptr + b * sqb + hw_offsets(offs_m, W, sqh, sqw)[:, None] + offs_d[None, :] * sqc,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(lse_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    do_base = do_ptr + b * sdb + hw_offsets(offs_m, W, sdh, sdw)[:, None]  # [BLOCK_M, 1]
    k_base = k_ptr + b * skb + offs_d[:, None] * skc  # [BLOCK_D, 1]
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt = tl.load(k_base + hw_offsets(offs_n, W, skh, skw)[None, :],
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _mma(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # padded keys add nothing
        hw_v = hw_offsets(offs_n, W, svh, svw)
        dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            do = tl.load(do_base + offs_c[None, :] * sdc,
                         mask=mask_m[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_M, BLOCK_C]
            v = tl.load(v_ptr + b * svb + offs_c[:, None] * svc + hw_v[None, :],
                        mask=mask_c[:, None] & mask_n[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
            dp = _mma(do, v, dp, IEEE)
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        dq = _mma(ds, tl.trans(kt), dq, IEEE)

    dq_ptrs = dq_ptr + b * Ck * N + offs_d[None, :] * N + offs_m[:, None]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


def _blocks(Ck: int, C: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and launch settings of all PAM kernels. tl.dot needs every dimension >= 16 on a
    GPU. Exact fp32 dots run on the CUDA cores (no tensor cores), so fp32 gets smaller tiles.

    fwd: BLOCK_M queries x BLOCK_C value channels per program, BLOCK_N keys per step;
    bwd: BLOCK_N keys (dK/dV) or BLOCK_M queries (dQ) per program, the other one per step, and the
    dP = dO^T v reduction over C in BLOCK_CB chunks; the split dV launch uses BLOCK_CV chunks.

    Checked with ptxas for sm_90 (Triton 3.8): no register spills for Ck <= 64 and C up to 512 in
    any dtype; shared memory <= 41 KiB per program."""
    D = pow2(Ck, 16, 1 << 30)
    wide = D > 64  # Ck beyond DANet's C / 8 = 64: halve the query tiles so that q stays in registers
    if dtype == torch.float32:
        return dict(BLOCK_D=D, FWD_M=32 if wide else 64, FWD_N=16, FWD_C=pow2(C, 16, 64), FWD_WARPS=8,
                    FWD_STAGES=2, BWD_M=16, BWD_N=32, BLOCK_CB=pow2(C, 16, 32), BLOCK_CV=pow2(C, 16, 64),
                    BWD_WARPS=8, BWD_STAGES=2)
    return dict(BLOCK_D=D, FWD_M=64 if wide else 128, FWD_N=64, FWD_C=pow2(C, 16, 128), FWD_WARPS=8,
                FWD_STAGES=2, BWD_M=32 if wide else 64, BWD_N=64, BLOCK_CB=pow2(C, 16, 32),
                BLOCK_CV=pow2(C, 16, 128), BWD_WARPS=8, BWD_STAGES=2)


def _check_blocks(bs: dict[str, int], Ck: int) -> None:
    if bs["BLOCK_D"] < Ck:
        raise ValueError(f"BLOCK_D = {bs['BLOCK_D']} must cover the key width Ck = {Ck}")


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _launch_position_attention_fwd(q: Tensor, k: Tensor, v: Tensor,
                                   blocks: dict[str, int] | None = None) -> tuple[Tensor, Tensor]:
    """(out [B, C, H, W] contiguous in v's dtype, lse [B, N] fp32) for q, k, v of any strides."""
    B, Ck, H, W = q.shape
    C = v.shape[1]
    N = H * W
    out = torch.empty((B, C, H, W), device=v.device, dtype=v.dtype)
    lse = torch.empty((B, N), device=v.device, dtype=torch.float32)
    if B * N == 0:
        return out, lse
    bs = blocks or _blocks(Ck, C, q.dtype)
    _check_blocks(bs, Ck)
    # At least one channel block, so that C = 0 still writes lse.
    grid = (B * triton.cdiv(N, bs["FWD_M"]), max(1, triton.cdiv(C, bs["FWD_C"])))
    kernel = _position_attention_fwd_kernel if interpreting() else wrap_triton(_position_attention_fwd_kernel)
    kernel[grid](
        q, k, v, out, lse,
        Ck, C, W, N,
        *_strides(q), *_strides(k), *_strides(v),
        IEEE=q.dtype == torch.float32,
        BLOCK_M=bs["FWD_M"], BLOCK_N=bs["FWD_N"], BLOCK_D=bs["BLOCK_D"], BLOCK_C=bs["FWD_C"],
        num_warps=bs["FWD_WARPS"], num_stages=bs["FWD_STAGES"],
    )
    return out, lse


def _launch_position_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                   lse: Tensor, blocks: dict[str, int] | None = None
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v), contiguous, in the dtypes of q, k, v; grad_out and out any strides."""
    B, Ck, H, W = q.shape
    C = v.shape[1]
    N = H * W
    if B * N == 0 or C == 0:  # C = 0: dP = 0, so dS = 0 and every gradient is zero
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format)
    dq = torch.empty((B, Ck, H, W), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, Ck, H, W), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, C, H, W), device=v.device, dtype=v.dtype)
    bs = blocks or _blocks(Ck, C, q.dtype)
    _check_blocks(bs, Ck)
    lse = lse.to(torch.float32).contiguous()
    query_tiles = B * triton.cdiv(N, bs["BWD_M"])
    key_tiles = B * triton.cdiv(N, bs["BWD_N"])
    tiles = dict(BLOCK_M=bs["BWD_M"], BLOCK_N=bs["BWD_N"], BLOCK_D=bs["BLOCK_D"])
    launch = dict(IEEE=q.dtype == torch.float32, num_warps=bs["BWD_WARPS"], num_stages=bs["BWD_STAGES"])

    delta = torch.empty((B, N), device=q.device, dtype=torch.float32)
    pre = _position_attention_bwd_preprocess_kernel
    pre = pre if interpreting() else wrap_triton(_position_attention_bwd_preprocess_kernel)
    pre[(query_tiles,)](
        out, grad_out, delta,
        C, W, N,
        *_strides(out), *_strides(grad_out),
        BLOCK_M=bs["BWD_M"], BLOCK_C=bs["BLOCK_CB"], num_warps=4,
    )

    args = (q, k, v, grad_out, lse, delta)
    sizes = (Ck, C, W, N, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    dkdv = _position_attention_bwd_dkdv_kernel
    dkdv = dkdv if interpreting() else wrap_triton(_position_attention_bwd_dkdv_kernel)
    if C <= bs["BLOCK_CB"]:  # one chunk: dK and dV from the same pass over the queries
        dkdv[(key_tiles, 1)](*args, dk, dv, *sizes, DK=True, DV=True, BLOCK_C=bs["BLOCK_CB"], **tiles, **launch)
    else:  # dV split over programs by channel chunk, dK with the dP loop over all chunks
        dkdv[(key_tiles, triton.cdiv(C, bs["BLOCK_CV"]))](
            *args, dk, dv, *sizes, DK=False, DV=True, BLOCK_C=bs["BLOCK_CV"], **tiles, **launch)
        dkdv[(key_tiles, 1)](*args, dk, dv, *sizes, DK=True, DV=False, BLOCK_C=bs["BLOCK_CB"], **tiles, **launch)

    dq_kernel = _position_attention_bwd_dq_kernel
    dq_kernel = dq_kernel if interpreting() else wrap_triton(_position_attention_bwd_dq_kernel)
    dq_kernel[(query_tiles,)](*args, dq, *sizes, BLOCK_C=bs["BLOCK_CB"], **tiles, **launch)
    return dq, dk, dv


# ---- ops ---------------------------------------------------------------------------------------


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    check_dtype("position_attention", "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[0] != q.shape[0] \
            or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"expected q, k [B, Ck, H, W] and v [B, C, H, W], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")


@torch.library.triton_op("fastseg::position_attention_triton", mutates_args=())
def _position_attention_triton(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    _check(q, k, v)
    return _launch_position_attention_fwd(q, k, v)


@torch.library.triton_op("fastseg::_position_attention_triton_backward", mutates_args=())
def _position_attention_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                        lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) of out = position_attention(q, k, v)[0]; lse is the forward's."""
    _check(q, k, v)
    return _launch_position_attention_bwd(grad_out.to(v.dtype), q, k, v, out, lse)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out, grad_lse):
    # lse is non-differentiable: its grad is ignored.
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    return tuple(torch.ops.fastseg._position_attention_triton_backward(grad_out, q, k, v, out, lse))


torch.library.register_autograd("fastseg::position_attention_triton", _backward, setup_context=_setup_context)


def position_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """DANet position attention on Triton, without the N x N matrix (N = H * W).

    Args:
        q, k: [B, Ck, H, W] queries and keys (any strides).
        v: [B, C, H, W] values (any strides, C may differ from Ck); same dtype as q and k.

    Returns:
        (out [B, C, H, W] contiguous in v's dtype, lse [B, N] fp32: the natural log-sum-exp of each
        query's energies, not differentiable). Under CUDA autocast, q, k and v run in the autocast
        dtype.

    Example::

        >>> out, lse = position_attention(q, k, v)  # q, k [2, 8, 17, 19], v [2, 64, 17, 19]
    """
    if q.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    return torch.ops.fastseg.position_attention_triton(q, k, v)
