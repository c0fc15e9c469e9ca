// CUDA kernels of fastseg::separable_conv2d.
//
// Forward: one fused kernel. A block owns kTileP output pixels of one image x kTileO output
// channels and walks the input channels in chunks of kTileC: it computes the chunk's depthwise
// values for its pixels (+ affine + ReLU) into shared memory next to the matching pointwise
// weights, and accumulates the 1x1 product in registers; the epilogue applies the pointwise
// affine + ReLU. The [N, C, Ho, Wo] depthwise intermediate is never materialised.
// Backward: the depthwise primitives below + the shared composite (cuBLAS for the GEMMs).
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

#include "ops/common/separable_conv.h"
#include "ops/separable_conv2d.h"

namespace fastseg::ops {
namespace {

using common::affine_act;
using common::tap_input;
using common::tap_output;

constexpr int kThreads = 256;
// 64 output channels x kTileP pixels per block, 16 x 16 threads with a 4 x kMicroP micro-tile
// each: 64 x 64 tiles do 16 FMAs per 8 shared loads, and 16-channel chunks keep both shared tiles
// at 4 KiB (fp32) / 8 KiB (fp64). Narrower pixel tiles (kMicroP 2 or 1: 32 or 16 pixels) are
// used when the 64-pixel tiles would give fewer blocks than the GPU has SMs (ASPP at 33 x 33:
// 72 blocks for 132 SMs).
constexpr int kTileO = 64, kTileC = 16;
constexpr int kMicro = 4, kLanes = 16;  // 16 threads along each tile side
static_assert(kLanes * kLanes == kThreads && kTileO / kMicro == kLanes);
template <int kMicroP>
constexpr int kTileP = kLanes * kMicroP;
// Grid-stride kernels need no more blocks than this to fill any current GPU.
constexpr int64_t kMaxBlocks = 65535;

// Geometry of one channel plane, passed by value to the kernels.
struct Plane {
  int64_t H, W, Ho, Wo, k, s, d, pb;
};

Plane plane_of(int64_t H, int64_t W, int64_t k, const SepConvGeometry& g) {
  return {H,
          W,
          common::conv_out_size(H, g.pad_beg, g.pad_end, k, g.dilation, g.stride),
          common::conv_out_size(W, g.pad_beg, g.pad_end, k, g.dilation, g.stride),
          k,
          g.stride,
          g.dilation,
          g.pad_beg};
}

int64_t grid_stride_blocks(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Depthwise value at output pixel (oh, ow) of one channel: plane `xp` [H, W], taps `wc` [k, k].
// Shared by the fused forward and the depthwise forward primitive.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t depthwise_at(const scalar_t* __restrict__ xp,
                                              const scalar_t* __restrict__ wc, int64_t oh,
                                              int64_t ow, const Plane& pl) {
  acc_t acc = 0;
  for (int64_t i = 0; i < pl.k; ++i) {
    const int64_t ih = tap_input(oh, i, pl.s, pl.d, pl.pb);
    if (ih < 0 || ih >= pl.H) continue;
    for (int64_t j = 0; j < pl.k; ++j) {
      const int64_t iw = tap_input(ow, j, pl.s, pl.d, pl.pb);
      if (iw < 0 || iw >= pl.W) continue;
      acc += static_cast<acc_t>(xp[ih * pl.W + iw]) * static_cast<acc_t>(wc[i * pl.k + j]);
    }
  }
  return acc;
}

// Block b: output-channel tile b % o_tiles (fastest, so the blocks sharing a pixel tile run
// together and reuse its x reads from L2), pixel tile, then image.
template <typename scalar_t, int kMicroP>
__global__ void __launch_bounds__(kThreads)
    separable_conv2d_fused_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dw,
                                  const scalar_t* __restrict__ pw,
                                  const at::opmath_type<scalar_t>* __restrict__ dw_scale,
                                  const at::opmath_type<scalar_t>* __restrict__ dw_shift,
                                  const at::opmath_type<scalar_t>* __restrict__ pw_scale,
                                  const at::opmath_type<scalar_t>* __restrict__ pw_shift,
                                  scalar_t* __restrict__ out, Plane pl, int64_t C, int64_t O,
                                  int64_t p_tiles, int64_t o_tiles, bool dw_relu, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kTP = kTileP<kMicroP>;
  static_assert(kThreads % kTP == 0 && kTileC % (kThreads / kTP) == 0);
  __shared__ acc_t ys[kTileC][kTP];
  __shared__ acc_t ws[kTileC][kTileO + 1];  // +1: the transposing store avoids bank conflicts

  const int64_t P = pl.Ho * pl.Wo, HW = pl.H * pl.W, kk = pl.k * pl.k;
  const int64_t b = blockIdx.x;
  const int64_t o0 = (b % o_tiles) * kTileO;
  const int64_t p0 = (b / o_tiles % p_tiles) * kTP;
  const int64_t n = b / o_tiles / p_tiles;
  const int tid = threadIdx.x;

  // Depthwise role: a fixed pixel per thread, channels dc, dc + 4, ... of each chunk.
  const int dp = tid % kTP, dc = tid / kTP;
  const int64_t p = p0 + dp;
  const bool p_ok = p < P;
  const int64_t oh = p_ok ? p / pl.Wo : 0, ow = p_ok ? p % pl.Wo : 0;
  const scalar_t* xn = x + n * C * HW;

  // Pointwise role: channels ty + 16 i, pixels tx + 16 j (strided, so shared reads broadcast
  // or hit distinct banks and global stores stay coalesced).
  const int tx = tid % kLanes, ty = tid / kLanes;
  acc_t acc[kMicro][kMicroP] = {};

  for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
    for (int cl = dc; cl < kTileC; cl += kThreads / kTP) {
      const int64_t c = c0 + cl;
      acc_t v = 0;  // padding rows/columns must be 0, not garbage: they meet 0 weights
      if (p_ok && c < C) {
        v = affine_act<acc_t>(depthwise_at<scalar_t, acc_t>(xn + c * HW, dw + c * kk, oh, ow, pl),
                              dw_scale ? dw_scale[c] : acc_t(1), dw_shift ? dw_shift[c] : acc_t(0),
                              dw_relu);
      }
      ys[cl][dp] = v;
    }
    // pw is [O, C] row-major: consecutive threads read consecutive c of one row.
    for (int idx = tid; idx < kTileC * kTileO; idx += kThreads) {
      const int cl = idx % kTileC, ol = idx / kTileC;
      const int64_t c = c0 + cl, o = o0 + ol;
      ws[cl][ol] = (c < C && o < O) ? static_cast<acc_t>(pw[o * C + c]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int cl = 0; cl < kTileC; ++cl) {
      acc_t wv[kMicro], yv[kMicroP];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) wv[i] = ws[cl][ty + kLanes * i];
#pragma unroll
      for (int j = 0; j < kMicroP; ++j) yv[j] = ys[cl][tx + kLanes * j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicroP; ++j) acc[i][j] += wv[i] * yv[j];
    }
    __syncthreads();  // the next chunk overwrites ys / ws
  }

#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = o0 + ty + kLanes * i;
    if (o >= O) continue;
    const acc_t sc = pw_scale ? pw_scale[o] : acc_t(1), sh = pw_shift ? pw_shift[o] : acc_t(0);
    scalar_t* orow = out + (n * O + o) * P;
#pragma unroll
    for (int j = 0; j < kMicroP; ++j) {
      const int64_t q = p0 + tx + kLanes * j;
      if (q < P) orow[q] = static_cast<scalar_t>(affine_act<acc_t>(acc[i][j], sc, sh, relu));
    }
  }
}

// ---- depthwise primitives for the backward (opmath tensors: float / double) -----------------

template <typename scalar_t>
__global__ void depthwise_forward_kernel(const scalar_t* __restrict__ x,
                                         const scalar_t* __restrict__ w,
                                         scalar_t* __restrict__ out, Plane pl, int64_t C,
                                         int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = pl.Ho * pl.Wo;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t nc = e / P, p = e % P;
    out[e] = static_cast<scalar_t>(depthwise_at<scalar_t, acc_t>(
        x + nc * pl.H * pl.W, w + (nc % C) * pl.k * pl.k, p / pl.Wo, p % pl.Wo, pl));
  }
}

// Gather form of the transpose: each input element sums the outputs its taps fed, so every
// element is written once, deterministically and without atomics.
template <typename scalar_t>
__global__ void depthwise_backward_input_kernel(const scalar_t* __restrict__ grad,
                                                const scalar_t* __restrict__ w,
                                                scalar_t* __restrict__ gx, Plane pl, int64_t C,
                                                int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t HW = pl.H * pl.W, P = pl.Ho * pl.Wo;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t nc = e / HW, r = e % HW, ih = r / pl.W, iw = r % pl.W;
    const scalar_t* wc = w + (nc % C) * pl.k * pl.k;
    const scalar_t* gp = grad + nc * P;
    acc_t acc = 0;
    for (int64_t i = 0; i < pl.k; ++i) {
      const int64_t oh = tap_output(ih, i, pl.s, pl.d, pl.pb, pl.Ho);
      if (oh < 0) continue;
      for (int64_t j = 0; j < pl.k; ++j) {
        const int64_t ow = tap_output(iw, j, pl.s, pl.d, pl.pb, pl.Wo);
        if (ow < 0) continue;
        acc += static_cast<acc_t>(wc[i * pl.k + j]) * static_cast<acc_t>(gp[oh * pl.Wo + ow]);
      }
    }
    gx[e] = static_cast<scalar_t>(acc);
  }
}

// One block per channel computes all K x K taps in one pass over the gradient (each grad value is
// read once, not K^2 times), threads laid out 32 x 8 over (ow, oh) with int32 loops (no 64-bit
// division per element). kK is the kernel size when it is one of the instantiated ones (taps in
// registers); kK = 0 takes any k, one tap per pass. Fixed-order strided sums then a fixed-shape
// tree per tap: deterministic.
constexpr int kWeightGradTx = 32, kWeightGradTy = kThreads / kWeightGradTx;

template <typename scalar_t, int kK>
__global__ void __launch_bounds__(kThreads)
    depthwise_backward_weight_kernel(const scalar_t* __restrict__ grad,
                                     const scalar_t* __restrict__ x, scalar_t* __restrict__ gw,
                                     Plane pl, int64_t N, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRegTaps = kK > 0 ? kK * kK : 1;
  __shared__ acc_t warp_sums[kThreads / 32];
  const int k = kK > 0 ? kK : static_cast<int>(pl.k);
  const int Ho = static_cast<int>(pl.Ho), Wo = static_cast<int>(pl.Wo);
  const int H = static_cast<int>(pl.H), W = static_cast<int>(pl.W);
  const int s = static_cast<int>(pl.s), d = static_cast<int>(pl.d), pb = static_cast<int>(pl.pb);
  const int64_t c = blockIdx.x;
  const int passes = kK > 0 ? 1 : k * k;
  for (int pass = 0; pass < passes; ++pass) {
    acc_t acc[kRegTaps];
#pragma unroll
    for (int t = 0; t < kRegTaps; ++t) acc[t] = 0;
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* gp = grad + (n * C + c) * Ho * Wo;
      const scalar_t* xp = x + (n * C + c) * H * W;
      for (int oh = threadIdx.y; oh < Ho; oh += kWeightGradTy) {
        for (int ow = threadIdx.x; ow < Wo; ow += kWeightGradTx) {
          const acc_t gv = static_cast<acc_t>(gp[oh * Wo + ow]);
#pragma unroll
          for (int t = 0; t < kRegTaps; ++t) {
            const int tap = kK > 0 ? t : pass;
            const int ih = oh * s - pb + (tap / k) * d, iw = ow * s - pb + (tap % k) * d;
            if (ih >= 0 && ih < H && iw >= 0 && iw < W)
              acc[t] += gv * static_cast<acc_t>(xp[ih * W + iw]);
          }
        }
      }
    }
    const int tid = threadIdx.y * kWeightGradTx + threadIdx.x, lane = tid % 32, warp = tid / 32;
#pragma unroll
    for (int t = 0; t < kRegTaps; ++t) {
      acc_t v = acc[t];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) warp_sums[warp] = v;
      __syncthreads();
      if (warp == 0) {
        v = lane < kThreads / 32 ? warp_sums[lane] : acc_t(0);
        for (int off = kThreads / 64; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) gw[c * k * k + (kK > 0 ? t : pass)] = static_cast<scalar_t>(v);
      }
      __syncthreads();  // warp_sums is reused by the next tap
    }
  }
}

at::Tensor depthwise_forward(const at::Tensor& x_, const at::Tensor& w_, const SepConvGeometry& g) {
  const auto x = x_.contiguous(), w = w_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const Plane pl = plane_of(x.size(2), x.size(3), w.size(2), g);
  auto out = at::empty({N, C, pl.Ho, pl.Wo}, x.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_forward_cuda", [&] {
    depthwise_forward_kernel<scalar_t>
        <<<static_cast<unsigned>(grid_stride_blocks(total)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), pl, C, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor depthwise_backward_input(const at::Tensor& grad_, const at::Tensor& w_, int64_t H,
                                    int64_t W, const SepConvGeometry& g) {
  const auto grad = grad_.contiguous(), w = w_.contiguous();
  const int64_t N = grad.size(0), C = grad.size(1);
  // No outputs (input smaller than the kernel): x received no gradient.
  if (grad.numel() == 0) return at::zeros({N, C, H, W}, grad.options());
  const Plane pl = plane_of(H, W, w.size(2), g);
  auto gx = at::empty({N, C, H, W}, grad.options());
  const int64_t total = gx.numel();
  if (total == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "depthwise_backward_input_cuda", [&] {
    depthwise_backward_input_kernel<scalar_t>
        <<<static_cast<unsigned>(grid_stride_blocks(total)), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            grad.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            gx.mutable_data_ptr<scalar_t>(), pl, C, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

at::Tensor depthwise_backward_weight(const at::Tensor& grad_, const at::Tensor& x_, int64_t k,
                                     const SepConvGeometry& g) {
  const auto grad = grad_.contiguous(), x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  if (grad.numel() == 0) return at::zeros({C, 1, k, k}, x.options());
  const Plane pl = plane_of(x.size(2), x.size(3), k, g);
  auto gw = at::empty({C, 1, k, k}, x.options());
  TORCH_CHECK(gw.numel() <= std::numeric_limits<int32_t>::max(),
              "dw_weight has too many elements for the cuda kernel: ", gw.numel());
  TORCH_CHECK(pl.H * pl.W <= std::numeric_limits<int32_t>::max() &&
                  pl.Ho * pl.Wo <= std::numeric_limits<int32_t>::max(),
              "x is too large for the cuda depthwise weight gradient: ", pl.H, "x", pl.W);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward_weight_cuda", [&] {
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(C), dim3(kWeightGradTx, kWeightGradTy), 0,
               at::cuda::getCurrentCUDAStream()>>>(grad.const_data_ptr<scalar_t>(),
                                                   x.const_data_ptr<scalar_t>(),
                                                   gw.mutable_data_ptr<scalar_t>(), pl, N, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    // The kernel sizes of the architectures (1x1 .. 7x7) keep their taps in registers.
    switch (k) {
      case 1: launch(depthwise_backward_weight_kernel<scalar_t, 1>); break;
      case 3: launch(depthwise_backward_weight_kernel<scalar_t, 3>); break;
      case 5: launch(depthwise_backward_weight_kernel<scalar_t, 5>); break;
      case 7: launch(depthwise_backward_weight_kernel<scalar_t, 7>); break;
      default: launch(depthwise_backward_weight_kernel<scalar_t, 0>);
    }
  });
  return gw;
}

constexpr DepthwiseKernels kCudaDepthwise{depthwise_forward, depthwise_backward_input,
                                          depthwise_backward_weight};

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the cuda kernel, got ", x.device());
}

at::Tensor separable_conv2d_cuda(const at::Tensor& x, const at::Tensor& dw_weight,
                                 const at::Tensor& pw_weight,
                                 const std::optional<at::Tensor>& dw_scale,
                                 const std::optional<at::Tensor>& dw_shift,
                                 const std::optional<at::Tensor>& pw_scale,
                                 const std::optional<at::Tensor>& pw_shift, int64_t stride,
                                 int64_t pad_beg, int64_t pad_end, int64_t dilation, bool dw_relu,
                                 bool relu) {
  const SepConvGeometry g{stride, pad_beg, pad_end, dilation};
  const auto shape =
      separable_conv2d_check(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift, g);
  check_cuda(x);
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(x.device());
  auto out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const int64_t C = x.size(1), O = shape[1];
  const Plane pl = plane_of(x.size(2), x.size(3), dw_weight.size(2), g);
  const int64_t o_tiles = (O + kTileO - 1) / kTileO;
  auto tiles = [&](int tile_p) { return (pl.Ho * pl.Wo + tile_p - 1) / tile_p; };
  // The widest pixel tile that still gives every SM a block (the narrowest when none does).
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));  // x's device: the guard above made it current
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  int micro_p = 4;
  while (micro_p > 1 && shape[0] * tiles(kLanes * micro_p) * o_tiles < sms) micro_p /= 2;
  const int64_t p_tiles = tiles(kLanes * micro_p);
  const int64_t blocks = shape[0] * p_tiles * o_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "x is too large for the cuda kernel of separable_conv2d: ", blocks, " tiles");
  const auto xc = x.contiguous(), dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const auto opmath = at::toOpMathType(x.scalar_type());
  const auto ds = affine_param(dw_scale, opmath), dh = affine_param(dw_shift, opmath);
  const auto ps = affine_param(pw_scale, opmath), ph = affine_param(pw_shift, opmath);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "separable_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          xc.const_data_ptr<scalar_t>(), dwc.const_data_ptr<scalar_t>(),
          pwc.const_data_ptr<scalar_t>(), ptr_or_null<acc_t>(ds), ptr_or_null<acc_t>(dh),
          ptr_or_null<acc_t>(ps), ptr_or_null<acc_t>(ph), out.mutable_data_ptr<scalar_t>(), pl,
          C, O, p_tiles, o_tiles, dw_relu, relu);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (micro_p) {
      case 4: launch(separable_conv2d_fused_kernel<scalar_t, 4>); break;
      case 2: launch(separable_conv2d_fused_kernel<scalar_t, 2>); break;
      default: launch(separable_conv2d_fused_kernel<scalar_t, 1>);
    }
  });
  return out;
}

SepConvGrads separable_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw_weight,
    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_scale,
    const std::optional<at::Tensor>& dw_shift, const std::optional<at::Tensor>& pw_scale,
    const std::optional<at::Tensor>& pw_shift, int64_t stride, int64_t pad_beg, int64_t pad_end,
    int64_t dilation, bool dw_relu, bool relu) {
  check_cuda(x);
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  c10::cuda::CUDAGuard device_guard(x.device());
  return separable_conv2d_backward_impl(grad_out, x, dw_weight, pw_weight, dw_scale, dw_shift,
                                        pw_scale, pw_shift, {stride, pad_beg, pad_end, dilation},
                                        dw_relu, relu, kCudaDepthwise);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("separable_conv2d", &separable_conv2d_cuda);
  m.impl("_separable_conv2d_backward", &separable_conv2d_backward_cuda);
}

}  // namespace fastseg::ops
