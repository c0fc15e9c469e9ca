// CUDA kernel of fastseg::dynamic_mask_head (SOLOv2's dynamic mask prediction, inference only).
//
// One block per tile of kRows candidates x kPix = 128 pixels: a shared-memory tiled GEMM over E in
// steps of kK (operands widened to acc_t = float, or double for double inputs, when staged; every
// thread accumulates a (kRows / 16) x 8 micro-tile in registers), then the fused epilogue. The tile
// goes once through shared memory so that a warp holds 32 consecutive pixels of a row per step: each
// warp takes rows, thresholds the logits (ops/common/dynamic_mask_head.h: logit > logit(mask_thr)),
// packs them with __ballot_sync (two ballots make a 64-pixel word), counts them with __popcll and sums
// sigmoid over the mask with a shuffle reduction. Per (row, pixel tile) partial counts and sums are
// written and reduced afterwards in a fixed order (no float atomics: deterministic). The n x H*W
// logits never reach global memory.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "ops/common/dynamic_mask_head.h"
#include "ops/dynamic_mask_head.h"

namespace fastseg::ops {
namespace {

constexpr int kThreads = 256;
constexpr int kPix = 128;  // pixels per tile: 2 words
constexpr int kK = 16;     // reduction step

template <typename acc_t>
struct TileShape {
  // float: 64 rows (4 per thread); double: 32 rows, so that the tile of logits fits 48 KiB.
  static constexpr int kRows = sizeof(acc_t) == 4 ? 64 : 32;
  static constexpr int kMicroRows = kRows / 16;
};

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_of(acc_t x) {
  if constexpr (sizeof(acc_t) == 4) {
    return 1.0f / (1.0f + expf(-x));
  } else {
    return 1.0 / (1.0 + exp(-x));
  }
}

// kernels [n, E], features [E, hw] (contiguous); masks [n, words]; counts / sums [n, ptiles].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dynamic_mask_head_kernel(const scalar_t* __restrict__ kernels,
                             const scalar_t* __restrict__ features, int64_t n, int64_t e,
                             int64_t hw, int64_t words, int64_t ptiles, acc_t t,
                             uint64_t* __restrict__ masks, int32_t* __restrict__ counts,
                             acc_t* __restrict__ sums) {
  constexpr int kRows = TileShape<acc_t>::kRows, kMicro = TileShape<acc_t>::kMicroRows;
  // The staged operands, then (same memory, after the last step) the tile of logits; +1 column: the
  // epilogue's row reads and the micro-tile writes meet no bank conflict.
  constexpr int kStage = kK * kRows + kK * kPix, kTile = kRows * (kPix + 1);
  __shared__ acc_t smem[kStage > kTile ? kStage : kTile];
  auto s_a = reinterpret_cast<acc_t(*)[kRows]>(smem);
  auto s_b = reinterpret_cast<acc_t(*)[kPix]>(smem + kK * kRows);
  auto s_c = reinterpret_cast<acc_t(*)[kPix + 1]>(smem);

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t pt = blockIdx.x, p0 = pt * kPix;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRows;

  acc_t acc[kMicro][8];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < e; k0 += kK) {
    // Stage A transposed (s_a[k][row]) and B (s_b[k][pixel], coalesced along the pixels).
    for (int idx = tid; idx < kRows * kK; idx += kThreads) {
      const int row = idx / kK, k = idx % kK;
      const int64_t gr = r0 + row, gk = k0 + k;
      s_a[k][row] = gr < n && gk < e ? static_cast<acc_t>(kernels[gr * e + gk]) : acc_t(0);
    }
    for (int idx = tid; idx < kK * kPix; idx += kThreads) {
      const int k = idx / kPix, p = idx % kPix;
      const int64_t gk = k0 + k, gp = p0 + p;
      s_b[k][p] = gk < e && gp < hw ? static_cast<acc_t>(features[gk * hw + gp]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kK; ++k) {
      acc_t a[kMicro], b[8];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) a[i] = s_a[k][ty * kMicro + i];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = s_b[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) s_c[ty * kMicro + i][tx + 16 * j] = acc[i][j];
  __syncthreads();

  // Epilogue: warp w takes rows w, w + 8, ...; lane l holds pixels l, l + 32, l + 64, l + 96.
  const int lane = tid & 31, warp = tid >> 5;
  for (int row = warp; row < kRows; row += kThreads / 32) {
    const int64_t gr = r0 + row;
    if (gr >= n) break;  // uniform per warp
    uint32_t ballot[kPix / 32];
    acc_t s = acc_t(0);
#pragma unroll
    for (int q = 0; q < kPix / 32; ++q) {
      const int64_t gp = p0 + q * 32 + lane;
      const acc_t x = s_c[row][q * 32 + lane];
      const bool in = gp < hw && x > t;
      ballot[q] = __ballot_sync(0xffffffffu, in);
      if (in) s += sigmoid_of(x);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane < kPix / 64) {
      const int64_t w = pt * (kPix / 64) + lane;
      if (w < words)
        masks[gr * words + w] =
            static_cast<uint64_t>(ballot[2 * lane]) | (static_cast<uint64_t>(ballot[2 * lane + 1]) << 32);
    }
    if (lane == 0) {
      int count = 0;
#pragma unroll
      for (int q = 0; q < kPix / 32; ++q) count += __popc(ballot[q]);
      counts[gr * ptiles + pt] = count;
      sums[gr * ptiles + pt] = s;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_mask_head_cuda(const at::Tensor& kernels,
                                                                      const at::Tensor& features,
                                                                      double mask_thr) {
  dynamic_mask_head_check(kernels, features, mask_thr);
  TORCH_CHECK(kernels.is_cuda(), "kernels must be a CUDA tensor for the cuda kernel, got ",
              kernels.device());
  c10::cuda::CUDAGuard device_guard(kernels.device());
  const int64_t n = kernels.size(0), e = kernels.size(1);
  const int64_t hw = features.size(1) * features.size(2);
  const int64_t words = common::mask_words(hw);
  auto masks = at::empty({n, words}, kernels.options().dtype(at::kLong));
  if (n == 0 || hw == 0) {
    return {masks, at::zeros({n}, kernels.options().dtype(at::kFloat)),
            at::zeros({n}, kernels.options())};
  }
  const auto k = kernels.contiguous();
  const auto f = features.contiguous();
  const int64_t ptiles = (hw + kPix - 1) / kPix;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const double lt = common::mask_logit_threshold(mask_thr);
  auto counts = at::empty({n, ptiles}, kernels.options().dtype(at::kInt));
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "dynamic_mask_head_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kRows = TileShape<acc_t>::kRows;
    sums = at::empty({n, ptiles}, kernels.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t rtiles = (n + kRows - 1) / kRows;
    TORCH_CHECK(rtiles <= 65535, "too many kernels for the cuda kernel: ", n);
    acc_t t;
    if constexpr (sizeof(acc_t) == 8) t = lt; else t = common::mask_logit_threshold_f(lt);
    dynamic_mask_head_kernel<scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(ptiles), static_cast<unsigned>(rtiles)), kThreads, 0, stream>>>(
            k.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), n, e, hw, words, ptiles, t,
            reinterpret_cast<uint64_t*>(masks.mutable_data_ptr<int64_t>()),
            counts.mutable_data_ptr<int32_t>(), sums.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto count = counts.sum(1);
  const auto areas = count.to(at::kFloat);
  const auto total = sums.sum(1);
  auto maskness = total.div(count.clamp_min(1).to(total.scalar_type()));
  maskness.masked_fill_(count.eq(0), 0);  // empty masks: 0 (their sum is 0 already)
  return {masks, areas, maskness.to(kernels.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) { m.impl("dynamic_mask_head", &dynamic_mask_head_cuda); }

}  // namespace fastseg::ops
