// CPU kernels of fastseg::position_attention (DANet PAM), flash-attention style: the N x N
// attention matrix is never materialised, each thread holds one [query block, key block] tile.
//
// Forward: one task per (image, query block), streaming the key blocks: scores S = Q_blkᵀ K_blk
// (BLAS), online softmax (running row max m and sum l; when m grows, the partial sums so far are
// rescaled by exp(m_old - m_new)), out_blk += V_blk Pᵀ (BLAS) accumulated in the zeroed output.
// Epilogue: out_blk /= l, lse = m + log l.
// Backward (flash-attention 2): D = colsum(dO ∘ O); then one pass, one task per (image, key block),
// recomputes P = exp(S - lse) and dS = P ∘ (dOᵀ V - D) per tile and accumulates dV += dO P,
// dK += Q dS and dQ += K dSᵀ (into per-thread partials, summed in a fixed order): five GEMMs per
// tile, where a separate dQ pass would recompute S and dOᵀ V (C + 2 Ck more per element). No
// atomics, the same bits on every run (the tiles and the dQ partials, and so the bits, may change
// with the thread count).
//
// float and double are their own opmath types, so scratch, outputs and lse all share the input dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "ops/attention.h"

namespace fastseg::ops {
namespace {

// Tile of 256 queries x 512 keys: 512 KiB of float scores per thread (the backward keeps two),
// L2-sized, and long GEMMs; V is streamed once per query block, so taller blocks re-read it less.
// Measured at C = 512, Ck = 64, N = 64², one thread: 64 x 256 is 25% slower, 128 x 512 10% slower,
// 512 x 512 and 256 x 1024 no faster.
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 512;

struct Tiles {
  int64_t q, k;
};

// Smaller blocks when an image has fewer blocks than its share of the threads.
Tiles pick_tiles(int64_t B, int64_t N) {
  const int64_t per_image = std::max<int64_t>(1, (at::get_num_threads() + B - 1) / B);
  const int64_t split = std::max<int64_t>(1, (N + per_image - 1) / per_image);
  return {std::min(kQueryBlock, split), std::min(kKeyBlock, split)};
}

// A contiguous [B, rows, H, W] tensor seen as B row-major [rows, N] matrices.
template <typename T>
struct Planes {
  T* base;
  int64_t rows, N;
  at::TensorOptions opts;

  explicit Planes(const at::Tensor& t)
      : base(const_cast<T*>(t.const_data_ptr<T>())), rows(t.size(1)),
        N(t.size(2) * t.size(3)), opts(t.options()) {}

  T* ptr(int64_t b, int64_t r, int64_t j) const { return base + (b * rows + r) * N + j; }

  // Columns [j0, j0 + n) of image b: a [rows, n] BLAS operand with leading dimension N.
  at::Tensor block(int64_t b, int64_t j0, int64_t n) const {
    return at::from_blob(ptr(b, 0, j0), {rows, n}, {N, 1}, opts);
  }

  // column j0 + i of image b *= factor[i], for i < n.
  void scale_columns(int64_t b, int64_t j0, int64_t n, const T* factor) const {
    for (int64_t r = 0; r < rows; ++r) {
      T* row = ptr(b, r, j0);
      for (int64_t i = 0; i < n; ++i) row[i] *= factor[i];
    }
  }
};

// A row-major [rows, cols] tile in per-thread scratch.
template <typename T>
at::Tensor tile(T* scratch, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return at::from_blob(scratch, {rows, cols}, opts);
}

// s[r, :] -= shift[r] and then exp, in place; ATen's exp is the vectorised SLEEF one.
template <typename T>
void exp_shifted_rows(at::Tensor& s, const T* shift) {
  const int64_t cols = s.size(1);
  T* p = s.data_ptr<T>();
  for (int64_t r = 0; r < s.size(0); ++r) {
    const T sh = shift[r];
    for (int64_t j = 0; j < cols; ++j) p[r * cols + j] -= sh;
  }
  s.exp_();
}

// One key block of the online softmax, in place on the scores s [nq, nk]: the running row max m
// grows to cover the block, s becomes exp(s - m), and l is rescaled by alpha = exp(m_old - m_new)
// (0 on the first block, where m_old = -inf) before the new row sums are added.
template <typename T>
void online_softmax_block(at::Tensor& s, T* m, T* l, T* alpha) {
  const int64_t nq = s.size(0), nk = s.size(1);
  const T* p = s.const_data_ptr<T>();
  for (int64_t r = 0; r < nq; ++r) {
    T mx = m[r];
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, p[r * nk + j]);
    alpha[r] = std::exp(m[r] - mx);
    m[r] = mx;
  }
  exp_shifted_rows(s, m);
  for (int64_t r = 0; r < nq; ++r) {
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < nk; ++j) sum += p[r * nk + j];
    l[r] = l[r] * alpha[r] + sum;
  }
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse) {
  const Planes<T> Q(q), K(k), V(v), O(out);
  const int64_t B = q.size(0), N = Q.N;
  const Tiles t = pick_tiles(B, N);
  const int64_t q_blocks = (N + t.q - 1) / t.q;
  T* lse_p = lse.mutable_data_ptr<T>();

  at::parallel_for(0, B * q_blocks, 1, [&](int64_t begin, int64_t end) {
    auto scratch = at::empty({t.q * t.k}, q.options());  // per thread, seen by the profiler
    T* s_buf = scratch.mutable_data_ptr<T>();
    std::vector<T> m(t.q), l(t.q), alpha(t.q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / q_blocks, i0 = task % q_blocks * t.q, nq = std::min(t.q, N - i0);
      const auto q_t = Q.block(b, i0, nq).t();
      auto o_blk = O.block(b, i0, nq);
      std::fill_n(m.begin(), nq, -std::numeric_limits<T>::infinity());
      std::fill_n(l.begin(), nq, T(0));
      for (int64_t j0 = 0; j0 < N; j0 += t.k) {
        const int64_t nk = std::min(t.k, N - j0);
        auto s = tile(s_buf, nq, nk, q.options());
        at::mm_out(s, q_t, K.block(b, j0, nk));
        online_softmax_block(s, m.data(), l.data(), alpha.data());
        O.scale_columns(b, i0, nq, alpha.data());
        o_blk.addmm_(V.block(b, j0, nk), s.t());
      }
      for (int64_t r = 0; r < nq; ++r) {
        lse_p[b * N + i0 + r] = m[r] + std::log(l[r]);
        alpha[r] = T(1) / l[r];
      }
      O.scale_columns(b, i0, nq, alpha.data());
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  const Planes<T> dO(grad_out), Q(q), K(k), V(v), O(out), dK(grad_k), dV(grad_v);
  const int64_t B = q.size(0), Ck = Q.rows, C = V.rows, N = Q.N;
  const Tiles t = pick_tiles(B, N);
  const int64_t q_blocks = (N + t.q - 1) / t.q, k_blocks = (N + t.k - 1) / t.k;
  const auto opts = q.options();
  const T* lse_p = lse.const_data_ptr<T>();

  // D[i] = sum_c dO[c, i] O[c, i]: the row sums of dP ∘ P, i.e. the softmax backward's correction.
  auto delta = at::zeros({B, N}, opts);
  T* delta_p = delta.mutable_data_ptr<T>();
  at::parallel_for(0, B * q_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / q_blocks, i0 = task % q_blocks * t.q, nq = std::min(t.q, N - i0);
      T* d = delta_p + b * N + i0;
      for (int64_t c = 0; c < C; ++c) {
        const T *g = dO.ptr(b, c, i0), *o = O.ptr(b, c, i0);
        for (int64_t i = 0; i < nq; ++i) d[i] += g[i] * o[i];
      }
    }
  });

  // One pass, one task per (image, key block), looping over the query blocks: each tile recomputes
  // P = exp(S - lse) and dS = P ∘ (dOᵀ V - D) once and feeds all three gradients. dV and dK of the
  // key block have this task as their only writer; dQ sums over key blocks, so the tasks are cut
  // into one contiguous chunk per thread, each chunk accumulates into its own dQ partial over the
  // images it touches, and the partials are added in chunk order afterwards: no atomics, and the
  // bits depend only on the thread count. The partials cost Ck·N per thread, not N².
  const int64_t tasks = B * k_blocks;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), tasks);
  std::vector<at::Tensor> dq_parts(chunks);  // chunk c: [images it touches, Ck, H, W]
  auto chunk_begin = [&](int64_t c) { return c * tasks / chunks; };
  auto run_chunk = [&](int64_t c) {
    const int64_t begin = chunk_begin(c), end = chunk_begin(c + 1), b0 = begin / k_blocks;
    dq_parts[c] = at::zeros({(end - 1) / k_blocks - b0 + 1, Ck, q.size(2), q.size(3)}, opts);
    const Planes<T> dQ(dq_parts[c]);
    auto scratch = at::empty({2, t.q * t.k}, opts);
    T *p_buf = scratch[0].mutable_data_ptr<T>(), *ds_buf = scratch[1].mutable_data_ptr<T>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / k_blocks, j0 = task % k_blocks * t.k, nk = std::min(t.k, N - j0);
      const auto k_blk = K.block(b, j0, nk), v_blk = V.block(b, j0, nk);
      auto dv_blk = dV.block(b, j0, nk), dk_blk = dK.block(b, j0, nk);
      for (int64_t i0 = 0; i0 < N; i0 += t.q) {
        const int64_t nq = std::min(t.q, N - i0);
        at::Tensor p = tile(p_buf, nq, nk, opts), ds = tile(ds_buf, nq, nk, opts);
        const auto q_blk = Q.block(b, i0, nq), do_blk = dO.block(b, i0, nq);
        at::mm_out(p, q_blk.t(), k_blk);
        exp_shifted_rows(p, lse_p + b * N + i0);
        at::mm_out(ds, do_blk.t(), v_blk);
        const T *pp = p.const_data_ptr<T>(), *d = delta_p + b * N + i0;
        T* dsp = ds.mutable_data_ptr<T>();
        for (int64_t r = 0; r < nq; ++r) {
          const T dr = d[r];
#pragma omp simd
          for (int64_t j = 0; j < nk; ++j) dsp[r * nk + j] = pp[r * nk + j] * (dsp[r * nk + j] - dr);
        }
        dv_blk.addmm_(do_blk, p);
        dk_blk.addmm_(q_blk, ds);
        dQ.block(b - b0, i0, nq).addmm_(k_blk, ds.t());
      }
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) run_chunk(c);
  });
  for (int64_t c = 0; c < chunks; ++c) {
    grad_q.narrow(0, chunk_begin(c) / k_blocks, dq_parts[c].size(0)).add_(dq_parts[c]);
  }
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the cpu kernel, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "the cpu backend of position_attention supports float32 and float64, got ",
              q.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> position_attention_cpu(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v) {
  position_attention_check(q, k, v);
  check_cpu(q);
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t B = q.size(0), N = q.size(2) * q.size(3);
  auto out = at::zeros(v.sizes(), v.options());  // zeroed: the accumulator of the online softmax
  auto lse = at::empty({B, N}, q.options());
  if (B * N == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "position_attention_cpu", [&] {
    forward_kernel<scalar_t>(q.contiguous(), k.contiguous(), v.contiguous(), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> position_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse) {
  position_attention_backward_check(grad_out, q, k, v, out, lse);
  check_cpu(q);
  at::AutoDispatchBelowADInplaceOrView guard;
  auto grad_q = at::zeros(q.sizes(), q.options());
  auto grad_k = at::zeros(k.sizes(), k.options());
  auto grad_v = at::zeros(v.sizes(), v.options());
  if (q.size(0) * q.size(2) * q.size(3) == 0) return {grad_q, grad_k, grad_v};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "position_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out.contiguous(), q.contiguous(), k.contiguous(),
                              v.contiguous(), out.contiguous(), lse.contiguous(), grad_q, grad_k,
                              grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("position_attention", &position_attention_cpu);
  m.impl("_position_attention_backward", &position_attention_backward_cpu);
}

}  // namespace fastseg::ops
