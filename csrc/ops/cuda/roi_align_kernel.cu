// CUDA kernels of fastseg::roi_align, fastseg::roi_upsample and their backwards.
//
// All four ops are one of two maps over RoIAlign's sample grid (ops/common/roi.h):
// gather(norm): [N, C, H, W] -> [K, C, PH, PW], and its exact transpose scatter(norm).
// roi_align = gather(kCount), _roi_align_backward = scatter(kCount), roi_upsample(mode) =
// scatter(mode), _roi_upsample_backward = gather(mode).
//
// Gather: one thread per output element (k, c, ph, pw) walks its bin's samples, as torchvision's
// kernel does; every element is written once, so it is deterministic by construction.
// Scatter, two formulations chosen at run time:
//  - atomic (default): one thread per input element adds each sample's 4 bilinear terms with
//    atomicAdd (torchvision's backward). Fastest, but the order of the float additions depends
//    on scheduling, so the last bits vary run to run. fp16/bf16 accumulate in an fp32 buffer.
//  - gather (under torch.use_deterministic_algorithms(True)): one thread per output pixel sums
//    the contributions of its image's RoIs in RoI index order, so runs are bit-identical. A setup
//    kernel computes each RoI's geometry and the pixel extent its samples can touch, a stable
//    sort groups the RoIs by image, and each block (8 x 32 pixels x kChannels channels) culls
//    its image's RoIs against its tile into shared memory. Only samples whose coordinate lies
//    within about a pixel of a pixel can touch it; their index range follows from the grid's
//    linear formula widened by a rounding margin (a superset), and sample_tap decides exactly,
//    so the sum has the same terms as the atomic path.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/roi_align.h"

namespace fastseg::ops {
namespace {

using common::AxisTap;
using common::clamp_index;
using common::Norm;
using common::RoiGeometry;
using common::sample_tap;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Grid-stride kernels need no more blocks than this to fill any current GPU.
constexpr int64_t kMaxBlocks = 65535;
// Deterministic scatter: a warp owns one row of 32 pixels, so the y-side search is warp-uniform.
constexpr int kTileH = kWarps, kTileW = 32;
// Channels per thread: the per-pixel tap search is shared by all of them.
constexpr int kChannels = 8;
// x bins cached per pixel (in shared memory); a column meets at most 8 bins unless bins are
// narrower than ~0.3 px.
constexpr int kXCache = 8;
// RoIs culled per pass into shared memory (the RoI boxes take 88 / 104 bytes each).
constexpr int kCull = 128;
static_assert(kCull <= kThreads && kCull % 32 == 0);

int64_t grid_stride_blocks(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
}

// RoI k's grid in opmath: rois come in opmath (float32, float64 for float64 data), so the
// geometry is never computed in half.
template <typename acc_t>
__device__ __forceinline__ RoiGeometry<acc_t> load_geometry(const acc_t* __restrict__ rois,
                                                            int64_t k, acc_t spatial_scale,
                                                            int64_t PH, int64_t PW,
                                                            int64_t sampling_ratio, bool aligned) {
  return common::roi_geometry<acc_t>(rois + k * 5, spatial_scale, PH, PW, sampling_ratio,
                                     aligned);
}

// ---- gather: roi_align, _roi_upsample_backward ------------------------------------------------

// out[k, c, ph, pw] = sum over the bin's samples of the 4 bilinear terms (/ count for kCount).
// The y tap is hoisted out of the x loop; caching the x taps would need grid_w registers.
// 4 blocks per SM (<= 64 registers): ptxas' own target of 48 spills around the fdiv slow path;
// fp64 needs twice the registers for the same live values, so 2 blocks (<= 128) there.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, sizeof(at::opmath_type<scalar_t>) == 8 ? 2 : 4)
    roi_gather_kernel(const scalar_t* __restrict__ x,
                      const at::opmath_type<scalar_t>* __restrict__ rois,
                      scalar_t* __restrict__ out, int64_t N, int64_t C, int64_t H, int64_t W,
                      int64_t PH, int64_t PW, at::opmath_type<scalar_t> spatial_scale,
                      int64_t sampling_ratio, bool aligned, Norm norm, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pw = e % PW, ph = e / PW % PH, c = e / (PW * PH) % C, k = e / (PW * PH * C);
    const auto g = load_geometry<acc_t>(rois, k, spatial_scale, PH, PW, sampling_ratio, aligned);
    acc_t acc = 0;
    // Batch indices are not validated on device (it would synchronise): skip bad ones.
    if (g.batch >= 0 && g.batch < N) {
      const scalar_t* plane = x + (g.batch * C + c) * H * W;
      // Only samples near the map contribute: bounded work for huge RoIs (count stays exact).
      int64_t y0, y1, x0, x1;
      common::sample_span(g.start_h, g.bin_h, ph, g.grid_h, H, &y0, &y1);
      common::sample_span(g.start_w, g.bin_w, pw, g.grid_w, W, &x0, &x1);
      for (int64_t iy = y0; iy < y1; ++iy) {
        const AxisTap<acc_t> ty = sample_tap(g.start_h, g.bin_h, ph, iy, g.grid_h, H, norm);
        if (!ty.valid) continue;
        const scalar_t* r0 = plane + ty.low * W;
        const scalar_t* r1 = plane + ty.high * W;
        for (int64_t ix = x0; ix < x1; ++ix) {
          const AxisTap<acc_t> tx = sample_tap(g.start_w, g.bin_w, pw, ix, g.grid_w, W, norm);
          if (!tx.valid) continue;
          acc += ty.w_low * (tx.w_low * static_cast<acc_t>(r0[tx.low]) +
                             tx.w_high * static_cast<acc_t>(r0[tx.high])) +
                 ty.w_high * (tx.w_low * static_cast<acc_t>(r1[tx.low]) +
                              tx.w_high * static_cast<acc_t>(r1[tx.high]));
        }
      }
      if (norm == Norm::kCount) acc /= g.count;
    }
    out[e] = static_cast<scalar_t>(acc);
  }
}

// ---- scatter, atomic: _roi_align_backward, roi_upsample (default) -----------------------------

// The transpose of roi_gather_kernel term by term: element (k, c, ph, pw) adds value x weight to
// the 4 neighbours of each sample. `out` is zeroed, in opmath (fp32 for fp16/bf16: half atomics
// are slow and would round every partial sum to 11 bits).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    roi_scatter_atomic_kernel(const scalar_t* __restrict__ grad,
                              const at::opmath_type<scalar_t>* __restrict__ rois,
                              at::opmath_type<scalar_t>* __restrict__ out, int64_t N, int64_t C,
                              int64_t H, int64_t W, int64_t PH, int64_t PW,
                              at::opmath_type<scalar_t> spatial_scale, int64_t sampling_ratio,
                              bool aligned, Norm norm, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t pw = e % PW, ph = e / PW % PH, c = e / (PW * PH) % C, k = e / (PW * PH * C);
    const auto g = load_geometry<acc_t>(rois, k, spatial_scale, PH, PW, sampling_ratio, aligned);
    if (g.batch < 0 || g.batch >= N) continue;  // never write outside the output
    acc_t v = static_cast<acc_t>(grad[e]);
    if (norm == Norm::kCount) v /= g.count;
    acc_t* plane = out + (g.batch * C + c) * H * W;
    int64_t y0, y1, x0, x1;
    common::sample_span(g.start_h, g.bin_h, ph, g.grid_h, H, &y0, &y1);
    common::sample_span(g.start_w, g.bin_w, pw, g.grid_w, W, &x0, &x1);
    for (int64_t iy = y0; iy < y1; ++iy) {
      const AxisTap<acc_t> ty = sample_tap(g.start_h, g.bin_h, ph, iy, g.grid_h, H, norm);
      if (!ty.valid) continue;
      acc_t* r0 = plane + ty.low * W;
      acc_t* r1 = plane + ty.high * W;
      const acc_t v0 = v * ty.w_low, v1 = v * ty.w_high;
      for (int64_t ix = x0; ix < x1; ++ix) {
        const AxisTap<acc_t> tx = sample_tap(g.start_w, g.bin_w, pw, ix, g.grid_w, W, norm);
        if (!tx.valid) continue;
        atomicAdd(r0 + tx.low, v0 * tx.w_low);
        atomicAdd(r0 + tx.high, v0 * tx.w_high);
        atomicAdd(r1 + tx.low, v1 * tx.w_low);
        atomicAdd(r1 + tx.high, v1 * tx.w_high);
      }
    }
  }
}

// ---- scatter, deterministic gather formulation ------------------------------------------------

// One axis of a RoI's grid. Sample s = p * grid + i lies at v(s) = start + (s + 0.5) * bin / grid
// in exact arithmetic; sample_tap computes it in T to within `margin`.
template <typename T>
struct RoiAxis {
  T start, bin, margin;
  int64_t grid;
  double inv_step;  // grid / bin; NaN: no usable linear model, search every sample
  int32_t lo, hi;   // pixels [lo, hi) the RoI's samples can touch (a superset)
};

template <typename T>
struct RoiBox {
  RoiAxis<T> y, x;
  T scale;  // 1 / count for kCount, 1 for kAunet
};

struct SampleRange {
  int64_t begin, end;
};

template <typename T>
__device__ RoiAxis<T> make_axis(T start, T bin, int64_t grid, int64_t pooled, int64_t size) {
  RoiAxis<T> a;
  a.start = start;
  a.bin = bin;
  a.grid = grid;
  a.lo = a.hi = 0;
  a.inv_step = std::numeric_limits<double>::quiet_NaN();
  const double s = static_cast<double>(start), b = static_cast<double>(bin);
  // sample_tap's ~6 roundings each err by <= eps/2 of a term bounded by |start| + (pooled+1)|bin|;
  // 16 eps also covers the double arithmetic below.
  const double m = fabs(s) + (static_cast<double>(pooled) + 1.0) * fabs(b);
  a.margin = static_cast<T>(16.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) * m);
  if (grid <= 0) return a;  // no samples: nothing touched
  const double inv = static_cast<double>(grid) / b;
  if (!(isfinite(s) && isfinite(m) && isfinite(static_cast<double>(a.margin)) && isfinite(inv) &&
        b != 0.0)) {
    a.hi = static_cast<int32_t>(size);  // degenerate grid: every pixel, every sample
    return a;
  }
  a.inv_step = inv;
  const double n = static_cast<double>(pooled) * static_cast<double>(grid);
  const double v0 = s + 0.5 / inv, v1 = s + (n - 0.5) / inv;
  const double mg = static_cast<double>(a.margin);
  // Computed coordinates of valid samples lie in [L, U]; a coordinate v touches floor(max(v, 0))
  // and the pixel after it.
  const double L = fmax(fmin(v0, v1) - mg, -1.0);
  const double U = fmin(fmax(v0, v1) + mg, static_cast<double>(size));
  if (!(L <= U)) return a;
  a.lo = static_cast<int32_t>(clamp_index(floor(fmax(L, 0.0)), size));
  a.hi = static_cast<int32_t>(clamp_index(floor(fmax(U, 0.0)) + 2.0, size));
  return a;
}

// Samples of the axis that can touch pixel `pix`, as a superset. A tap touches pix (as low or
// high, zero weight included) only if its computed coordinate v lies in [pix - 1, pix + 1], or
// for pix == 1 in [-1, 0] (v clamps to 0 and high = 1 gets weight 0). Widening by `margin`
// bounds the exact coordinate, which maps linearly to s; +-1 sample covers this division.
template <typename T>
__device__ __forceinline__ SampleRange candidate_samples(const RoiAxis<T>& a, int64_t pooled,
                                                         int64_t pix) {
  const int64_t n = pooled * a.grid;
  if (isnan(a.inv_step)) return {0, n};
  const double mg = static_cast<double>(a.margin), s = static_cast<double>(a.start);
  const double lo = static_cast<double>(pix) - (pix == 1 ? 2.0 : 1.0) - mg;
  const double hi = static_cast<double>(pix) + 1.0 + mg;
  double q0 = (lo - s) * a.inv_step - 0.5, q1 = (hi - s) * a.inv_step - 0.5;
  if (q0 > q1) {  // bin < 0: an aligned RoI with x2 < x1 and a fixed sampling_ratio
    const double t = q0;
    q0 = q1;
    q1 = t;
  }
  return {clamp_index(floor(q0) - 1.0, n), clamp_index(floor(q1) + 2.0, n)};
}

// Calls f(p, w) for each bin p (in increasing order) with a sample touching pixel `pix`, where w
// is the sum of those samples' weights on pix -- row p of RoIAlign's interpolation matrix at pix.
// Zero-weight touches are reported too, so 0 * inf propagates as in the atomic path.
template <typename T, typename F>
__device__ __forceinline__ void for_each_bin(const RoiAxis<T>& a, int64_t pooled, int64_t size,
                                             int64_t pix, Norm norm, F&& f) {
  const SampleRange r = candidate_samples(a, pooled, pix);
  if (r.begin >= r.end) return;
  int64_t p = r.begin / a.grid, i = r.begin - p * a.grid;
  T w = 0;
  bool hit = false;
  for (int64_t s = r.begin; s < r.end && p < pooled; ++s) {
    const AxisTap<T> t = sample_tap(a.start, a.bin, p, i, a.grid, size, norm);
    if (t.valid) {
      if (t.low == pix) {
        w += t.w_low;
        hit = true;
      }
      if (t.high == pix) {
        w += t.w_high;
        hit = true;
      }
    }
    if (++i == a.grid || s + 1 == r.end) {
      if (hit) f(p, w);
      w = 0;
      hit = false;
      i = 0;
      ++p;
    }
  }
}

// Geometry, touched extent and image key of each RoI; RoIs with a bad batch index or nothing
// touched get key N and are left out.
template <typename scalar_t>
__global__ void roi_boxes_kernel(const at::opmath_type<scalar_t>* __restrict__ rois,
                                 RoiBox<at::opmath_type<scalar_t>>* __restrict__ boxes,
                                 int64_t* __restrict__ keys, int64_t K, int64_t N, int64_t H,
                                 int64_t W, int64_t PH, int64_t PW,
                                 at::opmath_type<scalar_t> spatial_scale, int64_t sampling_ratio,
                                 bool aligned, Norm norm) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < K;
       k += int64_t(gridDim.x) * blockDim.x) {
    const auto g = load_geometry<acc_t>(rois, k, spatial_scale, PH, PW, sampling_ratio, aligned);
    RoiBox<acc_t> box;
    box.y = make_axis(g.start_h, g.bin_h, g.grid_h, PH, H);
    box.x = make_axis(g.start_w, g.bin_w, g.grid_w, PW, W);
    box.scale = norm == Norm::kCount ? acc_t(1) / g.count : acc_t(1);
    boxes[k] = box;
    const bool live = g.batch >= 0 && g.batch < N && box.y.lo < box.y.hi && box.x.lo < box.x.hi;
    keys[k] = live ? g.batch : N;
  }
}

// starts[n] = first position in the sorted keys with key >= n, for n in [0, N].
__global__ void image_starts_kernel(const int64_t* __restrict__ sorted_keys,
                                    int64_t* __restrict__ starts, int64_t K, int64_t N) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j <= K;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t prev = j == 0 ? -1 : sorted_keys[j - 1];
    const int64_t cur = j == K ? N : sorted_keys[j];
    for (int64_t n = prev + 1; n <= cur; ++n) starts[n] = j;
  }
}

// Adds RoI k's contribution at pixel (h, w) for the thread's channels:
//     acc[c] += sum_p sum_q Ay[p, h] * Ax[q, w] * g[k, c, p, q]   (Ay carries the scale),
// gk = g + (k * C + c0) * PH * PW. The x bins of column w go to this thread's shared slots
// (xq, xw, stride kThreads), kXCache at a time, and the y bins are streamed against them: one
// pass unless bins are narrower than ~0.3 px. Only one search is live at a time, which keeps
// the kernel within 128 registers.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void add_roi(acc_t (&acc)[kChannels], const RoiBox<acc_t>& box,
                                        const scalar_t* __restrict__ gk, int32_t* xq, acc_t* xw,
                                        int nc, int64_t PH, int64_t PW, int64_t H, int64_t W,
                                        int64_t h, int64_t w, Norm norm) {
  if (h < box.y.lo || h >= box.y.hi || w < box.x.lo || w >= box.x.hi) return;
  const int64_t PP = PH * PW;
  for (int skip = 0;; skip += kXCache) {
    int xn = 0, seen = 0;
    for_each_bin(box.x, PW, W, w, norm, [&](int64_t q, acc_t wx) {
      if (seen++ < skip || xn == kXCache) return;
      xq[xn * kThreads] = static_cast<int32_t>(q);
      xw[xn * kThreads] = wx;
      ++xn;
    });
    if (xn == 0) return;
    for_each_bin(box.y, PH, H, h, norm, [&](int64_t p, acc_t wy) {
      wy *= box.scale;
      const scalar_t* gp = gk + p * PW;
      for (int j = 0; j < xn; ++j) {
        const acc_t wt = wy * xw[j * kThreads];
        const scalar_t* g = gp + xq[j * kThreads];
#pragma unroll
        for (int c = 0; c < kChannels; ++c)
          if (c < nc) acc[c] += wt * static_cast<acc_t>(g[c * PP]);
      }
    });
    if (seen <= skip + kXCache) return;
  }
}

// Block b: pixel tile b % tiles (fastest), channel group, then image. Every output element is
// written by exactly one thread, so `out` needs no zeroing. Two blocks per SM fit in 128
// registers with an fp32 accumulator; fp64 needs ~170 and runs one (it would spill otherwise).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, sizeof(at::opmath_type<scalar_t>) == 8 ? 1 : 2)
    roi_scatter_gather_kernel(const scalar_t* __restrict__ grad,
                              const RoiBox<at::opmath_type<scalar_t>>* __restrict__ boxes,
                              const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                              scalar_t* __restrict__ out, int64_t C, int64_t H, int64_t W,
                              int64_t PH, int64_t PW, int64_t tiles_w, int64_t tiles,
                              int64_t groups, Norm norm) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ RoiBox<acc_t> s_box[kCull];
  __shared__ int64_t s_k[kCull];
  __shared__ int s_count[kWarps];
  __shared__ int32_t s_xq[kXCache * kThreads];
  __shared__ acc_t s_xw[kXCache * kThreads];

  const int64_t b = blockIdx.x;
  const int64_t tile = b % tiles, grp = b / tiles % groups, n = b / tiles / groups;
  const int64_t h0 = tile / tiles_w * kTileH, w0 = tile % tiles_w * kTileW;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t h = h0 + warp, w = w0 + lane;
  const bool inside = h < H && w < W;
  const int64_t c0 = grp * kChannels;
  const int nc = static_cast<int>(std::min<int64_t>(kChannels, C - c0));
  const int64_t PP = PH * PW;

  acc_t acc[kChannels] = {};
  const int64_t first = starts[n], last = starts[n + 1];
  for (int64_t j0 = first; j0 < last; j0 += kCull) {
    // Cull the next kCull of the image's RoIs against the tile, keeping RoI order (ballot
    // prefix sums).
    const int64_t j = j0 + tid;
    bool keep = false;
    int64_t k = 0;
    RoiBox<acc_t> box;
    if (tid < kCull && j < last) {
      k = order[j];
      box = boxes[k];
      keep = box.y.lo < h0 + kTileH && box.y.hi > h0 && box.x.lo < w0 + kTileW && box.x.hi > w0;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int base = 0, count = 0;
#pragma unroll
    for (int i = 0; i < kWarps; ++i) {
      base += i < warp ? s_count[i] : 0;
      count += s_count[i];
    }
    if (keep) {
      const int pos = base + __popc(ballot & ((1u << lane) - 1u));
      s_box[pos] = box;
      s_k[pos] = k;
    }
    __syncthreads();
    if (inside) {
      for (int r = 0; r < count; ++r)
        add_roi<scalar_t, acc_t>(acc, s_box[r], grad + (s_k[r] * C + c0) * PP, s_xq + tid,
                                 s_xw + tid, nc, PH, PW, H, W, h, w, norm);
    }
    __syncthreads();  // the next chunk overwrites s_box / s_count
  }
  if (!inside) return;
  scalar_t* o = out + ((n * C + c0) * H + h) * W + w;
#pragma unroll
  for (int c = 0; c < kChannels; ++c)
    if (c < nc) o[c * H * W] = static_cast<scalar_t>(acc[c]);
}

// ---- host side --------------------------------------------------------------------------------

void check_cuda(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor for the cuda kernel of ", op, ", got ",
              x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "the cuda backend of ", op, " supports float32, float64, float16 and bfloat16 ",
              name, ", got ", t);
}

// gather(norm) of x [N, C, H, W] into [K, C, PH, PW].
at::Tensor gather_cuda(const at::Tensor& x, const at::Tensor& rois, int64_t PH, int64_t PW,
                       double spatial_scale, int64_t sampling_ratio, bool aligned, Norm norm) {
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t K = rois.size(0), N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (K * C * PH * PW == 0) return at::empty({K, C, PH, PW}, x.options());
  // No images or no pixels: every RoI reads nothing.
  if (x.numel() == 0) return at::zeros({K, C, PH, PW}, x.options());
  auto out = at::empty({K, C, PH, PW}, x.options());
  const auto xc = x.contiguous();
  const auto rc = rois.to(at::toOpMathType(x.scalar_type())).contiguous();
  const int64_t total = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "roi_gather_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    roi_gather_kernel<scalar_t><<<static_cast<unsigned>(grid_stride_blocks(total)), kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), N, C, H, W, PH, PW, static_cast<acc_t>(spatial_scale),
        sampling_ratio, aligned, norm, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_atomic(const at::Tensor& g, const at::Tensor& rois, int64_t N, int64_t H,
                          int64_t W, double spatial_scale, int64_t sampling_ratio, bool aligned,
                          Norm norm) {
  const int64_t C = g.size(1), PH = g.size(2), PW = g.size(3), total = g.numel();
  // fp16/bf16: an fp32 buffer, converted once at the end.
  auto acc = at::zeros({N, C, H, W}, g.options().dtype(at::toOpMathType(g.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "roi_scatter_atomic_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    roi_scatter_atomic_kernel<scalar_t><<<static_cast<unsigned>(grid_stride_blocks(total)),
                                          kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), rois.const_data_ptr<acc_t>(),
        acc.mutable_data_ptr<acc_t>(), N, C, H, W, PH, PW, static_cast<acc_t>(spatial_scale),
        sampling_ratio, aligned, norm, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return acc.scalar_type() == g.scalar_type() ? acc : acc.to(g.scalar_type());
}

at::Tensor scatter_deterministic(const at::Tensor& g, const at::Tensor& rois, int64_t N,
                                 int64_t H, int64_t W, double spatial_scale,
                                 int64_t sampling_ratio, bool aligned, Norm norm) {
  const int64_t K = g.size(0), C = g.size(1), PH = g.size(2), PW = g.size(3);
  constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(H <= kInt32Max && W <= kInt32Max && PW <= kInt32Max,
              "height, width and pooled_w must be < 2^31 for the deterministic cuda kernel, got (",
              H, ", ", W, ", ", PW, ")");
  const int64_t tiles_w = (W + kTileW - 1) / kTileW;
  const int64_t tiles = (H + kTileH - 1) / kTileH * tiles_w;
  const int64_t groups = (C + kChannels - 1) / kChannels;
  const int64_t blocks = N * groups * tiles;
  TORCH_CHECK(blocks <= kInt32Max,
              "the output is too large for the deterministic cuda kernel: ", blocks, " tiles");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({N, C, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "roi_scatter_deterministic_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Box = RoiBox<acc_t>;
    auto boxes = at::empty({K * static_cast<int64_t>(sizeof(Box))}, g.options().dtype(at::kByte));
    auto keys = at::empty({K}, g.options().dtype(at::kLong));
    Box* box_ptr = reinterpret_cast<Box*>(boxes.mutable_data_ptr<uint8_t>());
    roi_boxes_kernel<scalar_t><<<static_cast<unsigned>(grid_stride_blocks(K)), kThreads, 0,
                                 stream>>>(rois.const_data_ptr<acc_t>(), box_ptr,
                                           keys.mutable_data_ptr<int64_t>(), K, N, H, W, PH, PW,
                                           static_cast<acc_t>(spatial_scale), sampling_ratio,
                                           aligned, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Stable: within an image the RoIs stay in index order, which fixes the summation order.
    const auto [sorted, order] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    auto starts = at::empty({N + 1}, keys.options());
    image_starts_kernel<<<static_cast<unsigned>(grid_stride_blocks(K + 1)), kThreads, 0,
                          stream>>>(sorted.const_data_ptr<int64_t>(),
                                    starts.mutable_data_ptr<int64_t>(), K, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    roi_scatter_gather_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), box_ptr, order.const_data_ptr<int64_t>(),
        starts.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), C, H, W, PH, PW,
        tiles_w, tiles, groups, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// scatter(norm) of g [K, C, PH, PW] into [N, C, H, W]. Atomics by default; the gather
// formulation when the user asked for deterministic algorithms.
at::Tensor scatter_cuda(const at::Tensor& g, const at::Tensor& rois, int64_t N, int64_t H,
                        int64_t W, double spatial_scale, int64_t sampling_ratio, bool aligned,
                        Norm norm) {
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(g.device());
  const int64_t C = g.size(1);
  if (N * C * H * W == 0 || g.numel() == 0) return at::zeros({N, C, H, W}, g.options());
  const auto gc = g.contiguous();
  const auto rc = rois.to(at::toOpMathType(g.scalar_type())).contiguous();
  if (at::globalContext().deterministicAlgorithms())
    return scatter_deterministic(gc, rc, N, H, W, spatial_scale, sampling_ratio, aligned, norm);
  return scatter_atomic(gc, rc, N, H, W, spatial_scale, sampling_ratio, aligned, norm);
}

at::Tensor roi_align_cuda(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h,
                          int64_t pooled_w, double spatial_scale, int64_t sampling_ratio,
                          bool aligned) {
  roi_align_check(features, rois, pooled_h, pooled_w);
  check_cuda(features, "features", "roi_align");
  return gather_cuda(features, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                     Norm::kCount);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                   int64_t batch_size, int64_t height, int64_t width,
                                   double spatial_scale, int64_t sampling_ratio, bool aligned) {
  roi_align_backward_check(grad, rois, batch_size, height, width);
  check_cuda(grad, "grad", "_roi_align_backward");
  return scatter_cuda(grad, rois, batch_size, height, width, spatial_scale, sampling_ratio,
                      aligned, Norm::kCount);
}

at::Tensor roi_upsample_cuda(const at::Tensor& roi_maps, const at::Tensor& rois,
                             int64_t batch_size, int64_t height, int64_t width,
                             double spatial_scale, int64_t sampling_ratio, bool aligned,
                             c10::string_view mode) {
  const Norm norm = roi_upsample_norm(mode);
  roi_upsample_check(roi_maps, rois, batch_size, height, width);
  check_cuda(roi_maps, "roi_maps", "roi_upsample");
  return scatter_cuda(roi_maps, rois, batch_size, height, width, spatial_scale, sampling_ratio,
                      aligned, norm);
}

at::Tensor roi_upsample_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                      int64_t pooled_h, int64_t pooled_w, double spatial_scale,
                                      int64_t sampling_ratio, bool aligned,
                                      c10::string_view mode) {
  const Norm norm = roi_upsample_norm(mode);
  roi_upsample_backward_check(grad, rois, pooled_h, pooled_w);
  check_cuda(grad, "grad", "_roi_upsample_backward");
  return gather_cuda(grad, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned,
                     norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("roi_align", &roi_align_cuda);
  m.impl("_roi_align_backward", &roi_align_backward_cuda);
  m.impl("roi_upsample", &roi_upsample_cuda);
  m.impl("_roi_upsample_backward", &roi_upsample_backward_cuda);
}

}  // namespace fastseg::ops
