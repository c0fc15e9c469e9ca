"""Triton backend of DANet's position attention (PAM), flash-attention style.

q, k [B, Ck, H, W], v [B, C, H, W], N = H * W. energy[i, j] = sum_c q[c, i] k[c, j] (no 1/sqrt(d)
scaling), A = softmax over the keys j, out[c, i] = sum_j v[c, j] A[i, j]. The N x N matrix never
exists in memory.

Channel chunks: no tile grows with Ck or C. The key width Ck is cut into BLOCK_D <= 64 chunks and the
value width C into BLOCK_C chunks. A program holds one chunk of its own operands (its queries or its
keys) for its whole loop; when a width has more chunks (WIDE_D: Ck > BLOCK_D, WIDE_C: C > BLOCK_C),
an inner loop streams the others (``_dot_chunks``, from L2). With one chunk there is no inner loop
and the main loop stays software-pipelined (DANet: Ck = C / 8 = 64, one chunk).

Forward, ``_position_attention_fwd_kernel``: a program owns BLOCK_M queries of one image and
BLOCK_C value channels; it walks the keys BLOCK_N at a time with an online softmax and fp32
accumulators, and writes out and lse [B, N] fp32 (the natural log-sum-exp of each query's
energies, kept for the backward). Its accumulator (BLOCK_M x BLOCK_C fp32) lives in registers, so
one program takes all value channels of its queries only up to BLOCK_C (128 for fp16 / bf16, 64
for fp32); a wider C is split over programs, each recomputing the energies of its query tile. The
recompute is bounded by the chunk width: (cdiv(C, BLOCK_C) - 1) * Ck / (Ck + C) of the forward's
dot work (DANet's C = 512, Ck = 64 in fp16: 4 chunks, +33%). A 256-wide chunk would halve that, but
its accumulator spills registers on sm_90a (ptxas) at DANet's odd map sizes (65, 97, 129 wide).

Backward (op ``fastseg::_position_attention_triton_backward``), flash-attention-2 style, with
P = exp(S - lse) recomputed and no atomics (deterministic):

* ``_position_attention_bwd_preprocess_kernel``: delta[i] = sum_c dO[c, i] O[c, i];
* ``_position_attention_bwd_dkdv_kernel``: a program per key block loops over the query blocks:
  dV[c, j] = sum_i P[i, j] dO[c, i], and dK[:, j] = sum_i dS[i, j] q[:, i] with
  dS = P * (dP - delta), dP[i, j] = sum_c dO[c, i] v[c, j] (over all of C). When Ck and C fit one
  chunk each, both come from one launch; otherwise dV is split over programs by C chunk (BLOCK_CV)
  and dK over programs by Ck chunk, in a second launch;
* ``_position_attention_bwd_dq_kernel``: a program per query block and Ck chunk loops over the key
  blocks: dQ[:, i] = sum_j dS[i, j] k[:, j].

Dtypes: float32, float16 and bfloat16 on CUDA, fp32 accumulation. fp16 / bf16 operands go to the
tensor cores as they are, with P and dS rounded to the input dtype for their dots as in flash
attention. float32 dots follow ``torch.get_float32_matmul_precision()`` as PyTorch's own matmuls
do: "highest" (PyTorch's default) exact fp32, "high" 3xTF32, "medium" TF32. float32 under
``TRITON_INTERPRET=1`` on CPU tensors.

Launches run on the inputs' device and its current stream, whatever device is current.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import check_dtype, dot_precision, hw_flat, hw_offsets, on_device, pow2
from fastseg.triton_kernels._common import kernel as _kernel

__all__ = ["position_attention"]

# Only W is not specialised (== 1 / % 16): it feeds the general hw_offsets path alone. N, Ck and C
# bound the masks along the contiguous axis (positions for NCHW, channels for channels_last), whose
# divisibility decides vector loads and cp.async pipelining (N unspecialised: no pipelining at N =
# 4096, checked with ptxas for sm_90a); and the strides, specialised for unit-stride vector loads,
# already carry their divisibility, so specialising them adds no variants.
_SIZES = ["W"]

# ---- kernels ---------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; ``a`` (an fp32 block: P or dS, or already b's dtype) is
    rounded to b's dtype (fp16 / bf16 operands for the tensor cores; a no-op for fp32)."""
    return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)


@triton.jit
def _dot_chunks(a_ptrs, s_a, mask_a, b_ptrs, s_b, mask_b, lo, hi, acc,
                PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + sum over the channels lo <= c < hi, BLOCK_K at a time, of a[:, c] b[c, :]: the chunks a
    program does not hold, streamed. a_ptrs [BLOCK_A, 1] and b_ptrs [1, BLOCK_B] point at channel 0
    of each row / column, s_a and s_b are the channel strides; the operands keep their dtype."""
    for c0 in range(lo, hi, BLOCK_K):
        offs = c0 + tl.arange(0, BLOCK_K)
        mask = offs < hi
        a = tl.load(a_ptrs + offs[None, :] * s_a, mask=mask_a[:, None] & mask[None, :], other=0.0)
        b = tl.load(b_ptrs + offs[:, None] * s_b, mask=mask[:, None] & mask_b[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=_SIZES)
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
    Q_FLAT: tl.constexpr, K_FLAT: tl.constexpr, V_FLAT: tl.constexpr,  # H, W collapse (hw_offsets)
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    WIDE_D: tl.constexpr,  # Ck > BLOCK_D: the key-width chunks after the first are streamed
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # key-width chunk (power of two >= 16)
    BLOCK_C: tl.constexpr,  # value channels per program
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    pid_c = tl.program_id(1)  # over max(1, cdiv(C, BLOCK_C))
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)  # the held key-width chunk
    mask_d = offs_d < Ck
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    # q block [BLOCK_M, BLOCK_D], held; padded rows / columns are zero.
    q_rows = q_ptr + b * sqb + hw_offsets(offs_m, W, sqh, sqw, Q_FLAT)[:, None]  # [BLOCK_M, 1]
    q = tl.load(q_rows + offs_d[None, :] * sqc, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * skb
    v_base = v_ptr + b * svb + offs_c[None, :] * svc  # [1, BLOCK_C]

    # Energies stay in natural units and exp() sees s - max: the rounding of the exponent is relative
    # to that small difference, not to the energy (hundreds with std-3 inputs, Ck = 64).
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the energies
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_cols = k_base + hw_offsets(offs_n, W, skh, skw, K_FLAT)[None, :]  # [1, BLOCK_N]
        kt = tl.load(k_cols + offs_d[:, None] * skc, mask=mask_d[:, None] & mask_n[None, :],
                     other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=PRECISION)
        if WIDE_D:
            s = _dot_chunks(q_rows, sqc, mask_m, k_cols, skc, mask_n, BLOCK_D, Ck, s, PRECISION, BLOCK_D)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Every key block holds at least one real key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + hw_offsets(offs_n, W, svh, svw, V_FLAT)[:, None],
                     mask=mask_n[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        acc = _mma(p, vt, acc * alpha[:, None], PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + b * C * N + offs_c[None, :] * N + offs_m[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + b * N + offs_m, lse, mask=mask_m & (pid_c == 0))


@triton.jit(do_not_specialize=_SIZES)
def _position_attention_bwd_preprocess_kernel(
    o_ptr,  # [B, C, H, W], strides (sob, soc, soh, sow): the forward's out
    do_ptr,  # [B, C, H, W], strides (sdb, sdc, sdh, sdw): grad of out
    delta_ptr,  # [B, N] fp32 contiguous, strides (N, 1): delta[i] = sum_c dO[c, i] O[c, i]
    C, W, N,
    sob, soc, soh, sow,
    sdb, sdc, sdh, sdw,
    O_FLAT: tl.constexpr, DO_FLAT: tl.constexpr,  # H, W collapse (hw_offsets)
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    o_base = o_ptr + b * sob + hw_offsets(offs_m, W, soh, sow, O_FLAT)[None, :]  # [1, BLOCK_M]
    do_base = do_ptr + b * sdb + hw_offsets(offs_m, W, sdh, sdw, DO_FLAT)[None, :]
    acc = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c < C)[:, None] & mask_m[None, :]
        o = tl.load(o_base + offs_c[:, None] * soc, mask=mask, other=0.0)
        do = tl.load(do_base + offs_c[:, None] * sdc, mask=mask, other=0.0)
        acc += o.to(tl.float32) * do.to(tl.float32)
    tl.store(delta_ptr + b * N + offs_m, tl.sum(acc, axis=0), mask=mask_m)


@triton.jit(do_not_specialize=_SIZES)
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
    Q_FLAT: tl.constexpr, K_FLAT: tl.constexpr, V_FLAT: tl.constexpr, DO_FLAT: tl.constexpr,
    DK: tl.constexpr,  # compute dK for this program's key-width chunk (needs dP over all of C)
    DV: tl.constexpr,  # compute dV for this program's value chunk
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    WIDE_D: tl.constexpr,  # Ck > BLOCK_D: the energies stream the key-width chunks not held
    WIDE_C: tl.constexpr,  # C > BLOCK_C (DK): dP streams the value chunks after the first
    BLOCK_M: tl.constexpr,  # queries per iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # key-width chunk (power of two >= 16)
    BLOCK_C: tl.constexpr,  # value chunk
):
    pid_n = tl.program_id(0)  # over B * cdiv(N, BLOCK_N)
    pid_j = tl.program_id(1)  # DK alone: over Ck chunks; DV alone: over C chunks; both: 1
    tiles = tl.cdiv(N, BLOCK_N)
    b = (pid_n // tiles).to(tl.int64)
    offs_n = (pid_n % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    jd = 0  # the held key-width chunk (dK's)
    jc = 0  # the held value chunk (dV's; chunk 0 starts dP)
    if DK:
        jd = pid_j
    if DV:
        jc = pid_j
    offs_d = jd * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Ck
    offs_c = jc * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C

    # This program's keys as rows, held: k^T chunk [BLOCK_N, BLOCK_D] (and v^T chunk [BLOCK_N, BLOCK_C]).
    k_rows = k_ptr + b * skb + hw_offsets(offs_n, W, skh, skw, K_FLAT)[:, None]  # [BLOCK_N, 1]
    kt = tl.load(k_rows + offs_d[None, :] * skc, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    v_rows = v_ptr + b * svb + hw_offsets(offs_n, W, svh, svw, V_FLAT)[:, None]  # [BLOCK_N, 1]
    if DK:
        vt = tl.load(v_rows + offs_c[None, :] * svc, mask=mask_n[:, None] & mask_c[None, :], other=0.0)
    q_base = q_ptr + b * sqb
    do_base = do_ptr + b * sdb
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_cols = q_base + hw_offsets(offs_m, W, sqh, sqw, Q_FLAT)[None, :]  # [1, BLOCK_M]
        qt = tl.load(q_cols + offs_d[:, None] * sqc, mask=mask_d[:, None] & mask_m[None, :],
                     other=0.0)  # [BLOCK_D, BLOCK_M]
        st = tl.dot(kt, qt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), input_precision=PRECISION)  # S^T
        if WIDE_D:  # the key-width chunks before and after the held one
            st = _dot_chunks(k_rows, skc, mask_n, q_cols, sqc, mask_m, 0, jd * BLOCK_D, st, PRECISION, BLOCK_D)
            st = _dot_chunks(k_rows, skc, mask_n, q_cols, sqc, mask_m, (jd + 1) * BLOCK_D, Ck, st, PRECISION,
                             BLOCK_D)
        lse = tl.load(lse_ptr + b * N + offs_m, mask=mask_m, other=0.0)
        pt = tl.exp(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)  # padded queries add nothing
        do_cols = do_base + hw_offsets(offs_m, W, sdh, sdw, DO_FLAT)[None, :]  # [1, BLOCK_M]
        dot_ = tl.load(do_cols + offs_c[:, None] * sdc, mask=mask_c[:, None] & mask_m[None, :],
                       other=0.0)  # dO^T chunk [BLOCK_C, BLOCK_M]
        if DV:
            dv = _mma(pt, tl.trans(dot_), dv, PRECISION)
        if DK:
            dpt = tl.dot(vt, dot_, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), input_precision=PRECISION)
            if WIDE_C:
                dpt = _dot_chunks(v_rows, svc, mask_n, do_cols, sdc, mask_m, BLOCK_C, C, dpt, PRECISION, BLOCK_C)
            delta = tl.load(delta_ptr + b * N + offs_m, mask=mask_m, other=0.0)
            dst = pt * (dpt - delta[None, :])  # dS^T [BLOCK_N, BLOCK_M]
            dk = _mma(dst, tl.trans(qt), dk, PRECISION)

    if DK:
        dk_ptrs = dk_ptr + b * Ck * N + offs_d[None, :] * N + offs_n[:, None]
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    if DV:
        dv_ptrs = dv_ptr + b * C * N + offs_c[None, :] * N + offs_n[:, None]
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=_SIZES)
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
    Q_FLAT: tl.constexpr, K_FLAT: tl.constexpr, V_FLAT: tl.constexpr, DO_FLAT: tl.constexpr,
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    WIDE_D: tl.constexpr,  # Ck > BLOCK_D: the energies stream the key-width chunks not held
    WIDE_C: tl.constexpr,  # C > BLOCK_C: dP streams the value chunks after the first
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per iteration
    BLOCK_D: tl.constexpr,  # key-width chunk (power of two >= 16): dQ's chunk per program
    BLOCK_C: tl.constexpr,  # value chunk of the dP reduction
):
    pid_m = tl.program_id(0)  # over B * cdiv(N, BLOCK_M)
    pid_d = tl.program_id(1)  # over max(1, cdiv(Ck, BLOCK_D))
    tiles = tl.cdiv(N, BLOCK_M)
    b = (pid_m // tiles).to(tl.int64)
    offs_m = (pid_m % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < Ck
    offs_c = tl.arange(0, BLOCK_C)  # the held value chunk (the first)
    mask_c = offs_c < C

    # This program's queries as rows, held: q chunk [BLOCK_M, BLOCK_D], dO chunk [BLOCK_M, BLOCK_C].
    q_rows = q_ptr + b * sqb + hw_offsets(offs_m, W, sqh, sqw, Q_FLAT)[:, None]  # [BLOCK_M, 1]
    q = tl.load(q_rows + offs_d[None, :] * sqc, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    do_rows = do_ptr + b * sdb + hw_offsets(offs_m, W, sdh, sdw, DO_FLAT)[:, None]  # [BLOCK_M, 1]
    do = tl.load(do_rows + offs_c[None, :] * sdc, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + b * N + offs_m, mask=mask_m, other=0.0)
    k_base = k_ptr + b * skb
    v_base = v_ptr + b * svb
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        k_cols = k_base + hw_offsets(offs_n, W, skh, skw, K_FLAT)[None, :]  # [1, BLOCK_N]
        kt = tl.load(k_cols + offs_d[:, None] * skc, mask=mask_d[:, None] & mask_n[None, :],
                     other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=PRECISION)
        if WIDE_D:  # the key-width chunks before and after the held one
            s = _dot_chunks(q_rows, sqc, mask_m, k_cols, skc, mask_n, 0, pid_d * BLOCK_D, s, PRECISION, BLOCK_D)
            s = _dot_chunks(q_rows, sqc, mask_m, k_cols, skc, mask_n, (pid_d + 1) * BLOCK_D, Ck, s, PRECISION,
                            BLOCK_D)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # padded keys add nothing
        v_cols = v_base + hw_offsets(offs_n, W, svh, svw, V_FLAT)[None, :]  # [1, BLOCK_N]
        v = tl.load(v_cols + offs_c[:, None] * svc, mask=mask_c[:, None] & mask_n[None, :],
                    other=0.0)  # [BLOCK_C, BLOCK_N]
        dp = tl.dot(do, v, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), input_precision=PRECISION)
        if WIDE_C:
            dp = _dot_chunks(do_rows, sdc, mask_m, v_cols, svc, mask_n, BLOCK_C, C, dp, PRECISION, BLOCK_C)
        ds = p * (dp - delta[:, None])  # [BLOCK_M, BLOCK_N]
        dq = _mma(ds, tl.trans(kt), dq, PRECISION)

    dq_ptrs = dq_ptr + b * Ck * N + offs_d[None, :] * N + offs_m[:, None]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


def _blocks(Ck: int, C: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and launch settings of all PAM kernels. tl.dot needs every dimension >= 16 on a
    GPU. fp32 gets smaller tiles: exact fp32 dots run on the CUDA cores, and fp32 tiles take twice
    the shared memory.

    BLOCK_D: the key-width chunk (<= 64 whatever Ck); fwd: FWD_M queries x FWD_C value channels per
    program, FWD_N keys per step; bwd: BWD_N keys (dK / dV) or BWD_M queries (dQ) per program, the
    other one per step, the dP reduction over C in BLOCK_CB chunks, the split dV launch BLOCK_CV
    channels per program, the delta pre-pass PRE_C channels per step.

    Checked with ptxas for sm_90a (Triton 3.6), Ck = 8 to 512 and C = 64 to 2048, contiguous,
    channels_last and cropped inputs: fp16 / bf16 no register spills and at most 64 KiB of shared
    memory per program; fp32 at most 32 KiB, a few bytes spilled only in some Ck > 64 and
    channels_last / cropped variants."""
    D = pow2(Ck, 16, 64)
    wide = Ck > D  # the energies stream further chunks (WIDE_D): smaller tiles, fewer registers
    if dtype == torch.float32:
        small = wide or dot_precision(dtype) == "tf32x3"  # 3xTF32 splits each operand in two
        return dict(BLOCK_D=D, FWD_M=32 if small else 64, FWD_N=16, FWD_C=pow2(C, 16, 64), FWD_WARPS=8,
                    FWD_STAGES=2, BWD_M=16, BWD_N=16 if small else 32, BLOCK_CB=pow2(C, 16, 32),
                    BLOCK_CV=pow2(C, 16, 64), PRE_C=pow2(C, 16, 32), BWD_WARPS=8, BWD_STAGES=2)
    return dict(BLOCK_D=D, FWD_M=64 if wide else 128, FWD_N=64, FWD_C=pow2(C, 16, 128), FWD_WARPS=8,
                FWD_STAGES=2, BWD_M=64, BWD_N=64, BLOCK_CB=pow2(C, 16, 64), BLOCK_CV=pow2(C, 16, 128),
                PRE_C=pow2(C, 16, 32), BWD_WARPS=8, BWD_STAGES=2)


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
    # At least one channel block, so that C = 0 still writes lse.
    grid = (B * triton.cdiv(N, bs["FWD_M"]), max(1, triton.cdiv(C, bs["FWD_C"])))
    _kernel(_position_attention_fwd_kernel)[grid](
        q, k, v, out, lse,
        Ck, C, W, N,
        *_strides(q), *_strides(k), *_strides(v),
        Q_FLAT=hw_flat(q), K_FLAT=hw_flat(k), V_FLAT=hw_flat(v),
        PRECISION=dot_precision(q.dtype), WIDE_D=Ck > bs["BLOCK_D"],
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
    lse = lse.to(torch.float32).contiguous()
    query_tiles = B * triton.cdiv(N, bs["BWD_M"])
    key_tiles = B * triton.cdiv(N, bs["BWD_N"])
    d_chunks = max(1, triton.cdiv(Ck, bs["BLOCK_D"]))

    delta = torch.empty((B, N), device=q.device, dtype=torch.float32)
    _kernel(_position_attention_bwd_preprocess_kernel)[(query_tiles,)](
        out, grad_out, delta,
        C, W, N,
        *_strides(out), *_strides(grad_out),
        O_FLAT=hw_flat(out), DO_FLAT=hw_flat(grad_out),
        BLOCK_M=bs["BWD_M"], BLOCK_C=bs["PRE_C"], num_warps=4,
    )

    args = (q, k, v, grad_out, lse, delta)
    sizes = (Ck, C, W, N, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    consts = dict(Q_FLAT=hw_flat(q), K_FLAT=hw_flat(k), V_FLAT=hw_flat(v), DO_FLAT=hw_flat(grad_out),
                  PRECISION=dot_precision(q.dtype), WIDE_D=Ck > bs["BLOCK_D"],
                  BLOCK_M=bs["BWD_M"], BLOCK_N=bs["BWD_N"], BLOCK_D=bs["BLOCK_D"],
                  num_warps=bs["BWD_WARPS"], num_stages=bs["BWD_STAGES"])
    wide_c = C > bs["BLOCK_CB"]
    dkdv = _kernel(_position_attention_bwd_dkdv_kernel)
    if d_chunks == 1 and not wide_c:  # one chunk of each width: dK and dV from one pass over the queries
        dkdv[(key_tiles, 1)](*args, dk, dv, *sizes, DK=True, DV=True, WIDE_C=False, BLOCK_C=bs["BLOCK_CB"],
                             **consts)
    else:  # dV split over programs by value chunk, dK by key-width chunk (with dP over all of C)
        dkdv[(key_tiles, triton.cdiv(C, bs["BLOCK_CV"]))](
            *args, dk, dv, *sizes, DK=False, DV=True, WIDE_C=False, BLOCK_C=bs["BLOCK_CV"], **consts)
        dkdv[(key_tiles, d_chunks)](
            *args, dk, dv, *sizes, DK=True, DV=False, WIDE_C=wide_c, BLOCK_C=bs["BLOCK_CB"], **consts)
    _kernel(_position_attention_bwd_dq_kernel)[(query_tiles, d_chunks)](
        *args, dq, *sizes, WIDE_C=wide_c, BLOCK_C=bs["BLOCK_CB"], **consts)
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
    with on_device(q):
        return _launch_position_attention_fwd(q, k, v)


@torch.library.triton_op("fastseg::_position_attention_triton_backward", mutates_args=())
def _position_attention_triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                        lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_q, grad_k, grad_v) of out = position_attention(q, k, v)[0]; lse is the forward's."""
    _check(q, k, v)
    with on_device(q):
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
