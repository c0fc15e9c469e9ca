// CUDA kernels of fastseg::esp_pyramid and its backward.
//
// Forward: one thread per (image, branch-channel o, pixel). It computes branch 0's channel o (when
// o < d1) and then branches 1..K-1 in order, keeping their running sum in a register and storing
// each partial sum: all K branches and the hierarchical fusion in one pass over x, no branch output
// written twice. Neighbouring threads share x through L1/L2.
// Backward: G_k = sum_{m >= k} grad_m (reverse cumulative sum over branches >= 1) by a small kernel
// in fp32; grad_x gathers, one thread per (image, input channel, pixel), the transposed dilated
// convolution of G with every branch's weights (no atomics); grad_w: one block per weight row and
// input channel reduces its 9 taps over all pixels in a fixed order (deterministic).
// Dtypes: float32, float64, float16, bfloat16; accumulation in at::opmath_type (fp32 for halves).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/common/esp_pyramid.h"
#include "ops/esp_pyramid.h"

namespace fastseg::ops {
namespace {

using common::esp_branch_of;
using common::esp_branch_start;
using common::esp_branch_width;
using common::esp_tap;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535LL * 32;
constexpr int kMaxBranches = 16;

// The dilation rates, passed by value to the kernels.
struct Dilations {
  int64_t v[kMaxBranches];
};

int64_t grid_blocks(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks); }

// sum over c and the 3x3 taps of w_row[c, i, j] * x_n[c, h + (i-1) dil, w + (j-1) dil]
template <typename scalar_t, typename acc_t>
__device__ acc_t dilated_dot(const scalar_t* __restrict__ xn, const scalar_t* __restrict__ w_row,
                             int64_t C, int64_t H, int64_t W, int64_t h, int64_t w, int64_t dil) {
  acc_t acc = 0;
  for (int i = 0; i < 3; ++i) {
    const int64_t ih = esp_tap(h, i, dil);
    if (ih < 0 || ih >= H) continue;
    for (int j = 0; j < 3; ++j) {
      const int64_t iw = esp_tap(w, j, dil);
      if (iw < 0 || iw >= W) continue;
      const scalar_t* xp = xn + ih * W + iw;
      const scalar_t* wp = w_row + i * 3 + j;
      for (int64_t c = 0; c < C; ++c)
        acc += static_cast<acc_t>(wp[c * 9]) * static_cast<acc_t>(xp[c * H * W]);
    }
  }
  return acc;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    esp_pyramid_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ wt,
                               scalar_t* __restrict__ out, EspGeometry g, Dilations dil) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.H * g.W, Dm = g.d1 > g.d ? g.d1 : g.d;
  const int64_t total = g.N * Dm * P;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx % P, o = (idx / P) % Dm, n = idx / (P * Dm);
    const int64_t h = p / g.W, w = p % g.W;
    const scalar_t* xn = x + n * g.C * P;
    scalar_t* on = out + n * g.D * P + p;
    if (o < g.d1)
      on[o * P] = static_cast<scalar_t>(
          dilated_dot<scalar_t, acc_t>(xn, wt + o * g.C * 9, g.C, g.H, g.W, h, w, dil.v[0]));
    if (o >= g.d) continue;
    acc_t sum = 0;
    for (int64_t k = 1; k < g.K; ++k) {
      const int64_t r = esp_branch_start(k, g.d1, g.d) + o;
      sum += dilated_dot<scalar_t, acc_t>(xn, wt + r * g.C * 9, g.C, g.H, g.W, h, w, dil.v[k]);
      on[r * P] = static_cast<scalar_t>(sum);
    }
  }
}

// G[n, r, p] = grad[n, r, p] for branch 0; for branch k >= 1, sum over m >= k of grad at the same
// channel offset in branch m. One thread per (image, channel offset, pixel).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    esp_grad_sums_kernel(const scalar_t* __restrict__ grad, acc_t* __restrict__ G, EspGeometry g) {
  const int64_t P = g.H * g.W, Dm = g.d1 > g.d ? g.d1 : g.d;
  const int64_t total = g.N * Dm * P;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx % P, o = (idx / P) % Dm, n = idx / (P * Dm);
    const scalar_t* gn = grad + n * g.D * P + p;
    acc_t* Gn = G + n * g.D * P + p;
    if (o < g.d1) Gn[o * P] = static_cast<acc_t>(gn[o * P]);
    if (o >= g.d) continue;
    acc_t sum = 0;
    for (int64_t k = g.K - 1; k >= 1; --k) {
      const int64_t r = esp_branch_start(k, g.d1, g.d) + o;
      sum += static_cast<acc_t>(gn[r * P]);
      Gn[r * P] = sum;
    }
  }
}

// grad_x[n, c, h, w] = sum_k sum_{o, i, j} w[start_k + o, c, i, j] G[n, start_k + o, h - (i-1) dil_k,
// w - (j-1) dil_k]: the transposed dilated convolution, as a gather.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    esp_grad_input_kernel(const acc_t* __restrict__ G, const scalar_t* __restrict__ wt,
                          scalar_t* __restrict__ gx, EspGeometry g, Dilations dil) {
  const int64_t P = g.H * g.W, total = g.N * g.C * P;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = idx % P, c = (idx / P) % g.C, n = idx / (P * g.C);
    const int64_t h = p / g.W, w = p % g.W;
    const acc_t* Gn = G + n * g.D * P;
    acc_t acc = 0;
    for (int64_t k = 0; k < g.K; ++k) {
      const int64_t s = esp_branch_start(k, g.d1, g.d), width = esp_branch_width(k, g.d1, g.d);
      for (int i = 0; i < 3; ++i) {
        const int64_t oh = esp_tap(h, 2 - i, dil.v[k]);  // h - (i - 1) dil
        if (oh < 0 || oh >= g.H) continue;
        for (int j = 0; j < 3; ++j) {
          const int64_t ow = esp_tap(w, 2 - j, dil.v[k]);
          if (ow < 0 || ow >= g.W) continue;
          const acc_t* Gp = Gn + s * P + oh * g.W + ow;
          const scalar_t* wp = wt + (s * g.C + c) * 9 + i * 3 + j;
          for (int64_t o = 0; o < width; ++o)
            acc += static_cast<acc_t>(wp[o * g.C * 9]) * Gp[o * P];
        }
      }
    }
    gx[idx] = static_cast<scalar_t>(acc);
  }
}

// grad_w[r, c, i, j] = sum_{n, h, w} G[n, r, h, w] x[n, c, h + (i-1) dil, w + (j-1) dil], one block
// per (r, c): each thread sums a fixed stride of pixels, then a fixed-order block reduction.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    esp_grad_weight_kernel(const acc_t* __restrict__ G, const scalar_t* __restrict__ x,
                           scalar_t* __restrict__ gw, EspGeometry g, Dilations dil) {
  __shared__ acc_t partial[9][kThreads];
  const int64_t r = blockIdx.x / g.C, c = blockIdx.x % g.C, P = g.H * g.W;
  const int64_t dk = dil.v[esp_branch_of(r, g.d1, g.d)];
  acc_t acc[9];
#pragma unroll
  for (int t = 0; t < 9; ++t) acc[t] = 0;
  for (int64_t q = threadIdx.x; q < g.N * P; q += kThreads) {
    const int64_t n = q / P, p = q % P, h = p / g.W, w = p % g.W;
    const acc_t gv = G[(n * g.D + r) * P + p];
    const scalar_t* xp = x + (n * g.C + c) * P;
#pragma unroll
    for (int t = 0; t < 9; ++t) {
      const int64_t ih = esp_tap(h, t / 3, dk), iw = esp_tap(w, t % 3, dk);
      if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) acc[t] += gv * static_cast<acc_t>(xp[ih * g.W + iw]);
    }
  }
#pragma unroll
  for (int t = 0; t < 9; ++t) partial[t][threadIdx.x] = acc[t];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
#pragma unroll
      for (int t = 0; t < 9; ++t) partial[t][threadIdx.x] += partial[t][threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x < 9) gw[blockIdx.x * 9 + threadIdx.x] = static_cast<scalar_t>(partial[threadIdx.x][0]);
}

Dilations pack_dilations(at::IntArrayRef dilations) {
  TORCH_CHECK(dilations.size() <= static_cast<size_t>(kMaxBranches),
              "the cuda backend of esp_pyramid takes at most ", kMaxBranches,
              " branches (dilations), got ", dilations.size());
  Dilations d{};
  for (size_t k = 0; k < dilations.size(); ++k) d.v[k] = dilations[k];
  return d;
}

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cuda(), "x must be a CUDA tensor for the cuda kernel, got ", x.device());
}

at::Tensor esp_pyramid_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t first_channels,
                            at::IntArrayRef dilations) {
  const auto g = esp_pyramid_check(x, weight, first_channels, dilations);
  check_cuda(x);
  const auto dil = pack_dilations(dilations);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto out = at::empty({g.N, g.D, g.H, g.W}, x.options());
  if (out.numel() == 0) return out;
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t total = g.N * std::max(g.d1, g.d) * g.H * g.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "esp_pyramid_cuda", [&] {
    esp_pyramid_forward_kernel<scalar_t>
        <<<static_cast<unsigned>(grid_blocks(total)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), g, dil);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> esp_pyramid_backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             int64_t first_channels,
                                                             at::IntArrayRef dilations) {
  const auto g = esp_pyramid_check(x, weight, first_channels, dilations);
  check_cuda(x);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.N, g.D, g.H, g.W}),
              "grad_out must have shape [", g.N, ", ", g.D, ", ", g.H, ", ", g.W, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  const auto dil = pack_dilations(dilations);
  c10::cuda::CUDAGuard device_guard(x.device());
  auto gx = at::zeros({g.N, g.C, g.H, g.W}, x.options());
  auto gw = at::zeros({g.D, g.C, 3, 3}, weight.options());
  if (grad_out.numel() == 0) return {gx, gw};
  const int64_t blocks_w = g.D * g.C;
  TORCH_CHECK(blocks_w <= std::numeric_limits<int32_t>::max(), "weight is too large for the cuda kernel");
  const auto gc = grad_out.to(x.scalar_type()).contiguous(), xc = x.contiguous(), wc = weight.contiguous();
  const auto G = at::empty({g.N, g.D, g.H, g.W}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t P = g.H * g.W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "esp_pyramid_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    esp_grad_sums_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(grid_blocks(g.N * std::max(g.d1, g.d) * P)), kThreads, 0, stream>>>(
            gc.const_data_ptr<scalar_t>(), G.mutable_data_ptr<acc_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    esp_grad_input_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(grid_blocks(g.N * g.C * P)), kThreads, 0, stream>>>(
            G.const_data_ptr<acc_t>(), wc.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(),
            g, dil);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    esp_grad_weight_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks_w), kThreads, 0, stream>>>(
        G.const_data_ptr<acc_t>(), xc.const_data_ptr<scalar_t>(), gw.mutable_data_ptr<scalar_t>(), g,
        dil);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("esp_pyramid", &esp_pyramid_cuda);
  m.impl("_esp_pyramid_backward", &esp_pyramid_backward_cuda);
}

}  // namespace fastseg::ops
