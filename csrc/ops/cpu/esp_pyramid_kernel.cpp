// CPU kernels of fastseg::esp_pyramid and its backward.
//
// Forward: one task per tile of rows of one image. For each branch k the tile's 3x3 dilated
// neighbourhood of x is unrolled into a [9C, tile] column block (row copies, zero edges) that stays
// in cache, and one BLAS GEMM writes the branch straight into its output channels. The hierarchical
// sum is the GEMM's accumulator: branch k >= 2 runs addmm with the previous branch's output block
// (already in cache) as its addend, so [y2, y2 + y3, ...] costs no pass of its own and no branch
// output is materialised. The PyTorch composition reads x K times, writes K outputs, and adds and
// concatenates them in separate passes.
//
// Backward: G_k = sum_{m >= k} grad_m (the reverse cumulative sum over branches >= 1; G_0 is
// grad_0) in one pass. Then, per tile: grad_x = sum_k conv(G_k, flipped transposed w_k, dil_k), the
// same column-block GEMM as the forward (a gather: tiles never write the same element), and
// grad_w_k += G_k[tile] @ col_k(x)^T into a per-thread accumulator, summed at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/common/esp_pyramid.h"
#include "ops/common/macros.h"
#include "ops/esp_pyramid.h"

namespace fastseg::ops {
namespace {

using common::esp_branch_start;
using common::esp_branch_width;
using common::esp_tap;

// Column block of rows [r0, r1) of the planes src [C, H, W] for a 3x3 conv with dilation dil
// (padding dil): col[((c * 3 + i) * 3 + j) * np + (r - r0) * W + w] = src[c, r + (i-1) dil,
// w + (j-1) dil], 0 outside the image; np = (r1 - r0) * W.
template <typename T>
FASTSEG_CPU_CLONES void im2col_rows(const T* __restrict__ src, int64_t C, int64_t H, int64_t W,
                                    int64_t r0, int64_t r1, int64_t dil, T* __restrict__ col) {
  const int64_t np = (r1 - r0) * W;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t i = 0; i < 3; ++i) {
      for (int64_t j = 0; j < 3; ++j) {
        T* dst = col + ((c * 3 + i) * 3 + j) * np;
        const int64_t off = esp_tap(0, j, dil);  // input column = w + off
        const int64_t lo = std::min(W, std::max<int64_t>(0, -off));
        const int64_t hi = std::max(lo, std::min(W, W - off));
        for (int64_t r = r0; r < r1; ++r) {
          T* drow = dst + (r - r0) * W;
          const int64_t ih = esp_tap(r, i, dil);
          if (ih < 0 || ih >= H) {
            std::fill(drow, drow + W, T(0));
            continue;
          }
          const T* srow = src + (c * H + ih) * W + off;
          std::fill(drow, drow + lo, T(0));
          std::memcpy(drow + lo, srow + lo, (hi - lo) * sizeof(T));
          std::fill(drow + hi, drow + W, T(0));
        }
      }
    }
  }
}

// Rows per tile: a [9 * Cmax, rows * W] column block within ~1 MiB (L2), and enough tiles to keep
// every thread busy.
int64_t tile_rows(int64_t N, int64_t Cmax, int64_t H, int64_t W, size_t elem) {
  const int64_t per_row = std::max<int64_t>(9 * Cmax * W * static_cast<int64_t>(elem), 1);
  int64_t rows = std::clamp<int64_t>((1 << 20) / per_row, 1, std::max<int64_t>(H, 1));
  const int64_t want = 4 * at::get_num_threads();
  while (rows > 1 && N * ((H + rows - 1) / rows) < want) rows = (rows + 1) / 2;
  return rows;
}

// A [rows, cols] matrix at p whose rows are `ld` elements apart (a strided view, no copy).
at::Tensor view2d(void* p, int64_t rows, int64_t cols, int64_t ld, const at::TensorOptions& o) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, o);
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef dil,
                  const EspGeometry& g, at::Tensor& out) {
  const int64_t C = g.C, H = g.H, W = g.W, P = H * W, D = g.D;
  const int64_t rows = tile_rows(g.N, C, H, W, sizeof(T)), tiles = (H + rows - 1) / rows;
  const auto w2 = weight.view({D, 9 * C});
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const auto opt = x.options();
  at::parallel_for(0, g.N * tiles, 1, [&](int64_t begin, int64_t end) {
    auto colbuf = at::empty({9 * C * rows * W}, opt);  // per-thread scratch
    T* col = colbuf.mutable_data_ptr<T>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, r0 = (t % tiles) * rows, r1 = std::min(H, r0 + rows);
      const int64_t np = (r1 - r0) * W;
      const auto col_t = view2d(col, 9 * C, np, np, opt);
      T* otile = op + n * D * P + r0 * W;
      for (int64_t k = 0; k < g.K; ++k) {
        im2col_rows(xp + n * C * P, C, H, W, r0, r1, dil[k], col);
        const int64_t s = esp_branch_start(k, g.d1, g.d), width = esp_branch_width(k, g.d1, g.d);
        auto o_k = view2d(otile + s * P, width, np, P, opt);
        const auto w_k = w2.narrow(0, s, width);
        if (k <= 1) {
          at::mm_out(o_k, w_k, col_t);
        } else {  // hierarchical sum: branch k adds onto the block of branches 1..k-1
          at::addmm_out(o_k, view2d(otile + (s - g.d) * P, width, np, P, opt), w_k, col_t);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                   at::IntArrayRef dil, const EspGeometry& g, at::Tensor& gx, at::Tensor& gw) {
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, P = H * W, D = g.D, K = g.K, d = g.d;
  const auto opt = x.options();
  const T* gp = grad.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();

  // G: the reverse cumulative sum of the grad over branches 1..K-1 (the same channel layout).
  auto G = at::empty({N, D, H, W}, opt);
  T* Gp = G.mutable_data_ptr<T>();
  const int64_t d1 = g.d1;
  at::parallel_for(0, N * std::max(d, d1), 1, [&](int64_t b, int64_t e) {
    for (int64_t no = b; no < e; ++no) {
      const int64_t n = no / std::max(d, d1), o = no % std::max(d, d1);
      const T* gn = gp + n * D * P;
      T* Gn = Gp + n * D * P;
      if (o < d1) std::memcpy(Gn + o * P, gn + o * P, P * sizeof(T));
      if (o >= d) continue;
      for (int64_t k = K - 1; k >= 1; --k) {
        const int64_t c = (esp_branch_start(k, d1, d) + o) * P;
        if (k == K - 1) {
          std::memcpy(Gn + c, gn + c, P * sizeof(T));
        } else {
          const T* above = Gn + c + d * P;
          for (int64_t p = 0; p < P; ++p) Gn[c + p] = gn[c + p] + above[p];
        }
      }
    }
  });

  // Flipped, transposed weights: grad_x = sum_k conv(G_k, wt_k) with wt_k [C, 9 width_k].
  std::vector<at::Tensor> wt(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = esp_branch_start(k, d1, d), width = esp_branch_width(k, d1, d);
    wt[k] = weight.narrow(0, s, width).flip({2, 3}).transpose(0, 1).reshape({C, 9 * width})
                .contiguous();
  }
  const int64_t Cmax = std::max({C, d1, d});
  const int64_t rows = tile_rows(N, Cmax, H, W, sizeof(T)), tiles = (H + rows - 1) / rows;
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, D, 9 * C}, opt);  // per-thread grad_w accumulators
  T* gxp = gx.mutable_data_ptr<T>();
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    auto colbuf = at::empty({9 * Cmax * rows * W}, opt);
    T* col = colbuf.mutable_data_ptr<T>();
    auto acc = partial[at::get_thread_num()];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, r0 = (t % tiles) * rows, r1 = std::min(H, r0 + rows);
      const int64_t np = (r1 - r0) * W;
      const T* Gn = Gp + n * D * P;
      auto gx_t = view2d(gxp + n * C * P + r0 * W, C, np, P, opt);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = esp_branch_start(k, d1, d), width = esp_branch_width(k, d1, d);
        const auto G_k = view2d(const_cast<T*>(Gn) + s * P + r0 * W, width, np, P, opt);
        // grad_x tile += wt_k @ col(G_k)
        im2col_rows(Gn + s * P, width, H, W, r0, r1, dil[k], col);
        const auto colG = view2d(col, 9 * width, np, np, opt);
        if (k == 0) {
          at::mm_out(gx_t, wt[k], colG);
        } else {
          gx_t.addmm_(wt[k], colG);
        }
        // grad_w_k += G_k @ col(x)^T
        im2col_rows(xp + n * C * P, C, H, W, r0, r1, dil[k], col);
        acc.narrow(0, s, width).addmm_(G_k, view2d(col, 9 * C, np, np, opt).t());
      }
    }
  });
  gw.copy_(partial.sum(0).view({D, C, 3, 3}));
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu kernel, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the cpu backend of esp_pyramid supports float32 and float64 x, got ",
              x.scalar_type());
}

at::Tensor esp_pyramid_cpu(const at::Tensor& x, const at::Tensor& weight, int64_t first_channels,
                           at::IntArrayRef dilations) {
  const auto g = esp_pyramid_check(x, weight, first_channels, dilations);
  check_cpu(x);
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = at::empty({g.N, g.D, g.H, g.W}, x.options());
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous(), wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "esp_pyramid_cpu", [&] {
    forward_impl<scalar_t>(xc, wc, dilations, g, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> esp_pyramid_backward_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& x,
                                                            const at::Tensor& weight,
                                                            int64_t first_channels,
                                                            at::IntArrayRef dilations) {
  const auto g = esp_pyramid_check(x, weight, first_channels, dilations);
  check_cpu(x);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.N, g.D, g.H, g.W}),
              "grad_out must have shape [", g.N, ", ", g.D, ", ", g.H, ", ", g.W, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto gx = at::zeros({g.N, g.C, g.H, g.W}, x.options());
  auto gw = at::zeros({g.D, g.C, 3, 3}, weight.options());
  if (grad_out.numel() == 0) return {gx, gw};
  const auto gc = grad_out.contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "esp_pyramid_backward_cpu", [&] {
    backward_impl<scalar_t>(gc, xc, wc, dilations, g, gx, gw);
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("esp_pyramid", &esp_pyramid_cpu);
  m.impl("_esp_pyramid_backward", &esp_pyramid_backward_cpu);
}

}  // namespace fastseg::ops
