"""Triton backend of DANet's channel attention (CAM).

x [B, C, H, W], X = x viewed as [B, C, N] (N = H * W): E = X X^T [B, C, C],
A = softmax(rowmax(E) - E) = softmax(-E) (made stable by subtracting each row's minimum of E),
out = A X [B, C, H, W]. E is only C x C (C = 512 in DANet) and is materialised in fp32.

Forward, three kernels:

* ``_channel_attention_gram_kernel``: E = P Q^T over the long N dimension (here P = Q = x, so only
  the tiles on and above the diagonal are computed, each stored twice). C x C has few tiles (36 on
  and above the diagonal at C = 512), so N is also split over programs (GRAM_SPLITS chunks of
  positions, up to about GRAM_PROGRAMS programs in all): each writes a partial Gram
  [splits, B, C, C] fp32 and the partials are summed over the splits in a fixed order (no atomics);
* ``_channel_attention_softmax_kernel``: A = softmax(-E) row by row (online row minimum and sum,
  then one normalising pass), in place;
* ``_channel_attention_matmul_kernel``: out = A X (optionally + A2 X2), a [C, C] x [C, N] product.

Backward (op ``fastseg::_channel_attention_triton_backward``, recomputes A from x):
dA = dOut X^T (the Gram kernel with P = dOut, Q = x), dS = A * (dA - rowsum(dA * A)) and
M = dE + dE^T = -(dS + dS^T) in torch (C x C, fp32), then dX = A^T dOut + M X in one launch of the
product kernel (A^T is a strided view: no copy). No atomics: deterministic.

Dtypes: float32, float16 and bfloat16 on CUDA, fp32 accumulation. Every dot takes
``input_precision=dot_precision(x.dtype)``: for float32 x that follows
``torch.get_float32_matmul_precision()`` as PyTorch's own matmuls do ("highest", PyTorch's default:
exact fp32; "high": 3xTF32; "medium": TF32). The Gram products take fp16 / bf16 operands as they
are. The C x C factors stay fp32 and the products with them take x upcast to fp32: TF32 for fp16 /
bf16 x (fp32 range, 10-bit mantissa: no fp16 overflow of the backward's M, better than rounding A to
bf16). float32 under ``TRITON_INTERPRET=1`` on CPU tensors.

Launches run on the input's device and its current stream, whatever device is current.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from fastseg.triton_kernels._common import check_dtype, dot_precision, hw_flat, hw_offsets, on_device, pow2
from fastseg.triton_kernels._common import kernel as _kernel

__all__ = ["channel_attention"]

# ---- kernels ---------------------------------------------------------------------------------


# B and W are not specialised (== 1 / % 16): they only offset the partial Grams and feed the general
# hw_offsets path. The strides, N, chunk and C are: they bound the masks along the contiguous axis
# (positions, or channels for channels_last), whose divisibility decides vector loads and cp.async
# pipelining, and the strides already carry their divisibility (no extra variants).
@triton.jit(do_not_specialize=["B", "W"])
def _channel_attention_gram_kernel(
    p_ptr,  # [B, C, H, W], strides (spb, spc, sph, spw) in elements, any memory format
    q_ptr,  # [B, C, H, W], strides (sqb, sqc, sqh, sqw); dtype of p (the same tensor when SYMMETRIC)
    e_ptr,  # [S, B, C, C] fp32 contiguous, strides (B*C*C, C*C, C, 1): the partial Gram of split s,
    #         e[s, b, i, j] = sum over n in [s * chunk, (s + 1) * chunk) of p[b, i, n] q[b, j, n]
    B, C, W, N, chunk,  # chunk: positions per split, a multiple of BLOCK_K
    spb, spc, sph, spw,
    sqb, sqc, sqh, sqw,
    P_FLAT: tl.constexpr, Q_FLAT: tl.constexpr,  # H, W collapse (hw_offsets)
    SYMMETRIC: tl.constexpr,  # p is q: compute the tiles with tile_j >= tile_i, store each twice
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype)
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,  # E tile (BLOCK_I == BLOCK_J when SYMMETRIC)
    BLOCK_K: tl.constexpr,  # positions per step
):
    pid_i = tl.program_id(0)  # over B * cdiv(C, BLOCK_I)
    pid_j = tl.program_id(1)  # over cdiv(C, BLOCK_J)
    pid_s = tl.program_id(2)  # over the splits S = cdiv(N, chunk)
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
    n_lo = pid_s * chunk
    n_end = tl.where(keep, tl.minimum(n_lo + chunk, N), n_lo)

    p_base = p_ptr + b * spb + offs_i[:, None] * spc  # [BLOCK_I, 1]
    q_base = q_ptr + b * sqb + offs_j[None, :] * sqc  # [1, BLOCK_J]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(n_lo, n_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < N  # chunk is a multiple of BLOCK_K: no step runs into the next split
        p = tl.load(p_base + hw_offsets(offs_k, W, sph, spw, P_FLAT)[None, :],
                    mask=mask_i[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_I, BLOCK_K]
        qt = tl.load(q_base + hw_offsets(offs_k, W, sqh, sqw, Q_FLAT)[:, None],
                     mask=mask_k[:, None] & mask_j[None, :], other=0.0)  # [BLOCK_K, BLOCK_J]
        acc = tl.dot(p, qt, acc, input_precision=PRECISION)

    e_base = e_ptr + (pid_s * B + b) * C * C
    mask = mask_i[:, None] & mask_j[None, :] & keep
    tl.store(e_base + offs_i[:, None] * C + offs_j[None, :], acc, mask=mask)
    if SYMMETRIC:
        # The mirror tile E[j, i] = E[i, j]^T (the diagonal tile writes itself twice, same values).
        tl.store(e_base + offs_j[None, :] * C + offs_i[:, None], acc, mask=mask)


# C stays specialised here: it is the row stride of E, whose rows load as vectors when C % 16 == 0.
@triton.jit(do_not_specialize=["R"])
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


@triton.jit(do_not_specialize=["W"])  # as the Gram; C also bounds the rows of the fp32 factors
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
    R_FLAT: tl.constexpr, R2_FLAT: tl.constexpr,  # H, W collapse (hw_offsets)
    TWO: tl.constexpr,  # add the second product
    PRECISION: tl.constexpr,  # input_precision of tl.dot: dot_precision(dtype of r); r upcast to fp32
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
    r_base = r_ptr + b * srb + hw_offsets(offs_j, W, srh, srw, R_FLAT)[None, :]  # [1, BLOCK_J]
    l2_base = l2_ptr + b * sl2b + offs_i[:, None] * sl2i
    r2_base = r2_ptr + b * sr2b + hw_offsets(offs_j, W, sr2h, sr2w, R2_FLAT)[None, :]
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        lt = tl.load(l_base + offs_k[None, :] * slk, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
        rt = tl.load(r_base + offs_k[:, None] * src, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        acc = tl.dot(lt, rt.to(tl.float32), acc, input_precision=PRECISION)
        if TWO:
            lt2 = tl.load(l2_base + offs_k[None, :] * sl2k, mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            rt2 = tl.load(r2_base + offs_k[:, None] * sr2c, mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            acc = tl.dot(lt2, rt2.to(tl.float32), acc, input_precision=PRECISION)

    out_ptrs = out_ptr + b * C * N + offs_i[:, None] * N + offs_j[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


# ---- launchers (allocate outputs, pick block sizes) -------------------------------------------


def _blocks(C: int, N: int, dtype: torch.dtype) -> dict[str, int]:
    """Block sizes and launch settings of all CAM kernels (tl.dot needs every dimension >= 16 on a
    GPU; exact fp32 dots run on the CUDA cores, so fp32 gets smaller tiles).

    GRAM: E tile GRAM x GRAM, GRAM_K positions per step; N split so that the Gram launch has about
    GRAM_PROGRAMS programs (2 to 4 waves on 132 SMs; fixed, so that results do not depend on the
    device), with at least GRAM_MIN_N positions per split. MM_I x MM_J output tile of the product,
    MM_K channels per step; SM_R rows x SM_C columns per softmax step. Checked with ptxas for sm_90a
    (Triton 3.6) at C = 512 and 2048, every dtype and fp32 precision: no register spills, at most
    120 KiB of shared memory (the two-term TF32 product)."""
    split = dict(GRAM_PROGRAMS=512, GRAM_MIN_N=512)
    if dtype == torch.float32:
        return dict(GRAM=pow2(C, 16, 64), GRAM_K=pow2(N, 16, 32), GRAM_WARPS=8, GRAM_STAGES=2, **split,
                    MM_I=pow2(C, 16, 64), MM_J=pow2(N, 16, 64), MM_K=pow2(C, 16, 16),
                    MM_WARPS=8, MM_STAGES=2, SM_R=4, SM_C=pow2(C, 16, 512))
    return dict(GRAM=pow2(C, 16, 64), GRAM_K=pow2(N, 16, 64), GRAM_WARPS=8, GRAM_STAGES=3, **split,
                MM_I=pow2(C, 16, 128), MM_J=pow2(N, 16, 64), MM_K=pow2(C, 16, 32),
                MM_WARPS=8, MM_STAGES=3, SM_R=4, SM_C=pow2(C, 16, 512))


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _gram_split(B: int, C: int, N: int, symmetric: bool, bs: dict[str, int]) -> tuple[int, int]:
    """(splits, chunk): N cut into splits chunks of chunk positions (whole GRAM_K steps), so that the
    Gram launch has about GRAM_PROGRAMS working programs, each over >= GRAM_MIN_N positions."""
    tiles = triton.cdiv(C, bs["GRAM"])
    programs = B * (tiles * (tiles + 1) // 2 if symmetric else tiles * tiles)
    splits = max(1, min(triton.cdiv(bs["GRAM_PROGRAMS"], programs), N // bs["GRAM_MIN_N"]))
    chunk = triton.cdiv(triton.cdiv(N, splits), bs["GRAM_K"]) * bs["GRAM_K"]
    return triton.cdiv(N, chunk), chunk


def _launch_gram(p: Tensor, q: Tensor, bs: dict[str, int]) -> Tensor:
    """E [B, C, C] fp32 contiguous with E[b, i, j] = sum_n p[b, i, n] q[b, j, n]; p, q [B, C, H, W],
    any strides. Deterministic: the partial Grams of the N splits are summed in a fixed order."""
    B, C, H, W = p.shape
    N = H * W
    if B * C == 0:
        return torch.empty((B, C, C), device=p.device, dtype=torch.float32)
    if N == 0:
        return torch.zeros((B, C, C), device=p.device, dtype=torch.float32)
    symmetric = p is q
    tiles = triton.cdiv(C, bs["GRAM"])
    splits, chunk = _gram_split(B, C, N, symmetric, bs)
    e = torch.empty((splits, B, C, C), device=p.device, dtype=torch.float32)
    _kernel(_channel_attention_gram_kernel)[(B * tiles, tiles, splits)](
        p, q, e,
        B, C, W, N, chunk,
        *_strides(p), *_strides(q),
        P_FLAT=hw_flat(p), Q_FLAT=hw_flat(q), SYMMETRIC=symmetric, PRECISION=dot_precision(p.dtype),
        BLOCK_I=bs["GRAM"], BLOCK_J=bs["GRAM"], BLOCK_K=bs["GRAM_K"],
        num_warps=bs["GRAM_WARPS"], num_stages=bs["GRAM_STAGES"],
    )
    return e[0] if splits == 1 else e.sum(dim=0)


def _launch_softmax_(e: Tensor, bs: dict[str, int]) -> Tensor:
    """softmax(-E) over the last dim of E [B, C, C] fp32 contiguous, in place; returns E."""
    B, C, _ = e.shape
    if e.numel() == 0:
        return e
    R = B * C
    _kernel(_channel_attention_softmax_kernel)[(triton.cdiv(R, bs["SM_R"]),)](
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
    _kernel(_channel_attention_matmul_kernel)[grid](
        lhs, rhs, lhs2, rhs2, out,
        C, W, N,
        *_strides(lhs), *_strides(rhs), *_strides(lhs2), *_strides(rhs2),
        R_FLAT=hw_flat(rhs), R2_FLAT=hw_flat(rhs2), TWO=two, PRECISION=dot_precision(rhs.dtype),
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
    with on_device(x):
        return _launch_channel_attention_fwd(x)


@torch.library.triton_op("fastseg::_channel_attention_triton_backward", mutates_args=())
def _channel_attention_triton_backward(grad_out: Tensor, x: Tensor) -> Tensor:
    """grad of x for out = channel_attention(x) (A recomputed from x)."""
    _check(x)
    # fp32 C x C algebra, even if the caller runs backward inside an autocast region.
    with on_device(x), torch.autocast(device_type=x.device.type, enabled=False):
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
