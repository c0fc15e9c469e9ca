// CPU kernels of fastseg::channel_attention (DANet CAM), one task per image. Inside a task BLAS and
// ATen's softmax run single-threaded; with a single image they use all threads themselves.
//
// E = X Xᵀ is symmetric, so BLAS computes only its upper-triangle panels and the rest is mirrored:
// a quarter of the forward's flops saved. softmax(rowmax(E) - E) = softmax(-E) by shift
// invariance, and ATen's softmax subtracts the row max of -E (the row min of E): stable for energies
// in the thousands. Scratch: per thread 2 (forward) or 3 (backward) [C, C] matrices, never [B, C, C].
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/_softmax_backward_data.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/attention.h"

namespace fastseg::ops {
namespace {

// Rows per Gram panel: smaller panels skip more of the lower triangle, larger ones make longer GEMMs.
constexpr int64_t kGramPanel = 128;

// The attention of one image x [C, N]: a = softmax(-x xᵀ) [C, C]; e is scratch, left holding -x xᵀ.
void attention(const at::Tensor& x, at::Tensor& e, at::Tensor& a) {
  const int64_t C = x.size(0);
  for (int64_t i = 0; i < C; i += kGramPanel) {
    const int64_t n = std::min(kGramPanel, C - i), rest = C - i - n;
    auto panel = e.narrow(0, i, n).narrow(1, i, C - i);  // rows [i, i + n), columns [i, C)
    at::mm_out(panel, x.narrow(0, i, n), x.narrow(0, i, C - i).t());
    e.narrow(0, i + n, rest).narrow(1, i, n).copy_(panel.narrow(1, n, rest).t());
  }
  at::_softmax_out(a, e.neg_(), 1, false);
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu kernel, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the cpu backend of channel_attention supports float32 and float64, got ",
              x.scalar_type());
}

at::Tensor channel_attention_cpu(const at::Tensor& x) {
  channel_attention_check(x);
  check_cpu(x);
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), C = x.size(1);
  const auto xs = x.contiguous().view({B, C, -1}), outs = out.view({B, C, -1});
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    auto e = at::empty({C, C}, x.options()), a = at::empty({C, C}, x.options());
    for (int64_t b = begin; b < end; ++b) {
      auto out_b = outs[b];
      attention(xs[b], e, a);
      at::mm_out(out_b, a, xs[b]);
    }
  });
  return out;
}

// With dS = A ∘ (dA - rowsum(dA ∘ A)) the gradient of the softmax input -E (the rowmax shift gets
// none: the rows of dS sum to 0), dE = -dS and dX = Aᵀ dOut + (dE + dEᵀ) X.
at::Tensor channel_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  channel_attention_backward_check(grad_out, x);
  check_cpu(x);
  at::AutoDispatchBelowADInplaceOrView guard;
  auto grad_x = at::empty(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;
  const int64_t B = x.size(0), C = x.size(1);
  const auto xs = x.contiguous().view({B, C, -1}), gos = grad_out.contiguous().view({B, C, -1});
  const auto gxs = grad_x.view({B, C, -1});
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    auto e = at::empty({C, C}, x.options()), a = at::empty_like(e), ds = at::empty_like(e);
    for (int64_t b = begin; b < end; ++b) {
      const auto x_b = xs[b], go_b = gos[b];
      auto gx_b = gxs[b];
      attention(x_b, e, a);
      at::mm_out(e, go_b, x_b.t());                                      // dA = dOut Xᵀ
      at::_softmax_backward_data_out(ds, e, a, 1, x.scalar_type());      // dS
      at::add_out(e, ds, ds.t());                                        // dS + dSᵀ = -(dE + dEᵀ)
      at::mm_out(gx_b, a.t(), go_b);
      gx_b.addmm_(e, x_b, 1, -1);
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("channel_attention", &channel_attention_cpu);
  m.impl("_channel_attention_backward", &channel_attention_backward_cpu);
}

}  // namespace fastseg::ops
