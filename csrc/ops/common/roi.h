#pragma once
// RoIAlign's sample grid (torchvision.ops.roi_align semantics) as separable 1-D interpolation
// rows, shared by the CPU and CUDA kernels of roi_align and roi_upsample.
//
// Sample (iy, ix) of bin (ph, pw) reads 4 pixels with weights (y factor) x (x factor), and both
// normalisers factor as well: 1/count is one constant per RoI, AUNet's per-sample 1/sum(w^2) is
// 1/(hy^2 + ly^2) * 1/(hx^2 + lx^2). So for RoI k and one channel plane X,
//     roi_align(X)[k]      = A_y X A_x^T          (gather)
//     roi_upsample(G)[k]   = A_y^T G A_x          (scatter, its exact transpose)
// where row p of A_y holds the summed y weights of bin p's samples (times 1/count for kCount) and
// row p of A_x the summed x weights. Kernels build these rows once per RoI and reuse them for
// every channel; a row is non-zero only on the few pixels its bin's samples touch.
#include "ops/common/macros.h"

#include <cmath>
#include <cstdint>
#include <limits>

namespace fastseg::common {

// How a sample's bilinear weights are normalised: by the number of samples in the bin (RoIAlign
// and its transpose, roi_upsample mode="adjoint") or by their sum of squares (mode="aunet").
enum class Norm : int { kCount = 0, kAunet = 1 };

// One RoI's sample grid; roi points at (batch_idx, x1, y1, x2, y2) in input coordinates, in the
// geometry type T: float32 for float32/float16/bfloat16 data, float64 for float64 data (boxes are
// never rounded to a half type, as under torchvision's autocast policy).
template <typename T>
struct RoiGeometry {
  int64_t batch;           // image index (truncated toward zero, as torchvision reads it)
  T start_h, start_w;      // top-left corner in feature coordinates
  T bin_h, bin_w;          // size of one output bin
  int64_t grid_h, grid_w;  // samples per bin along each axis (0: the RoI has no samples)
  T count;                 // max(grid_h * grid_w, 1): the kCount normaliser
};

// A bin axis wider than this many samples keeps this integer grid for its sample coordinates
// (float coordinates there are spaced far more than a pixel apart anyway); `count` keeps the
// exact ceil. Only sample_span's few samples near the map are ever visited.
constexpr double kMaxGrid = 1099511627776.0;  // 2^40

// x - x is 0 exactly for finite x and NaN for inf/NaN (no <cmath> isfinite on device).
template <typename T>
FASTSEG_HOST_DEVICE inline bool is_finite(T x) {
  return x - x == T(0);
}

// x clamped to [0, n] and truncated; NaN -> 0 (no undefined float -> int conversion).
FASTSEG_HOST_DEVICE inline int64_t clamp_index(double x, int64_t n) {
  if (!(x > 0.0)) return 0;
  return x < static_cast<double>(n) ? static_cast<int64_t>(x) : n;
}

// A RoI with a non-finite coordinate (after scaling) has no samples: roi_align gives zeros for it
// (as torchvision's kernels do) and roi_upsample drops it. The public API and the CPU ops reject
// such RoIs first; this only bounds what reaches a device kernel through torch.ops/compile.
template <typename T>
FASTSEG_HOST_DEVICE inline RoiGeometry<T> roi_geometry(const T* roi, T spatial_scale,
                                                       int64_t pooled_h, int64_t pooled_w,
                                                       int64_t sampling_ratio, bool aligned) {
  RoiGeometry<T> g;
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  T roi_w = roi[3] * spatial_scale - offset - g.start_w;
  T roi_h = roi[4] * spatial_scale - offset - g.start_h;
  if (!(is_finite(roi[0]) && is_finite(g.start_w) && is_finite(g.start_h) && is_finite(roi_w) &&
        is_finite(roi_h))) {
    g.batch = -1;
    g.start_h = g.start_w = g.bin_h = g.bin_w = T(0);
    g.grid_h = g.grid_w = 0;
    g.count = T(1);
    return g;
  }
  g.batch = roi[0] > T(-1) && roi[0] < T(4.0e18) ? static_cast<int64_t>(roi[0]) : -1;
  if (!aligned) {  // legacy RoIAlign: malformed RoIs are forced to 1 x 1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  // Integer-valued in T: ceil of a huge bin does not fit an int64.
  const T gh = sampling_ratio > 0 ? static_cast<T>(sampling_ratio) : ceil(g.bin_h);
  const T gw = sampling_ratio > 0 ? static_cast<T>(sampling_ratio) : ceil(g.bin_w);
  const T n = gh * gw;  // may overflow to inf: then every value is 0 / ... = 0, as it tends to
  g.count = n > T(1) ? n : T(1);
  // An inverted aligned RoI has a non-positive adaptive grid: torchvision's loops run 0 times.
  g.grid_h = clamp_index(static_cast<double>(gh) < kMaxGrid ? static_cast<double>(gh) : kMaxGrid,
                         static_cast<int64_t>(kMaxGrid));
  g.grid_w = clamp_index(static_cast<double>(gw) < kMaxGrid ? static_cast<double>(gw) : kMaxGrid,
                         static_cast<int64_t>(kMaxGrid));
  return g;
}

// Sample indices [begin, end) of bin p whose coordinate can lie in [-1, size]; no other sample
// contributes. A superset: the exact coordinate is linear in i, the computed one errs by at most
// `mg` (a few roundings of terms bounded by |start| + (p + 1)|bin|), and one more sample covers
// the division; sample_tap decides exactly. So the work per bin is about (size + 1) / step + 4
// samples (step = bin / grid >= 1/2 for adaptive grids), however large the RoI; the margin is
// capped at the map size, where float coordinates are meaningless anyway.
template <typename T>
FASTSEG_HOST_DEVICE inline void sample_span(T start, T bin, int64_t p, int64_t grid, int64_t size,
                                            int64_t* begin, int64_t* end) {
  *begin = *end = 0;
  if (grid <= 0) return;
  const double s = static_cast<double>(start), b = static_cast<double>(bin);
  const double step = b / static_cast<double>(grid);
  if (!(step != 0.0)) {  // every sample at one coordinate (grid is sampling_ratio: small)
    *end = grid;
    return;
  }
  const double base = s + static_cast<double>(p) * b;
  double mg = 16.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) *
              (fabs(s) + (static_cast<double>(p) + 1.0) * fabs(b));
  mg = mg < static_cast<double>(size) + 2.0 ? mg : static_cast<double>(size) + 2.0;
  double q0 = (-1.0 - mg - base) / step - 0.5, q1 = (static_cast<double>(size) + mg - base) / step - 0.5;
  if (q0 > q1) {  // bin < 0: an aligned RoI with x2 < x1 and a fixed sampling_ratio
    const double t = q0;
    q0 = q1;
    q1 = t;
  }
  *begin = clamp_index(floor(q0) - 1.0, grid);
  *end = clamp_index(floor(q1) + 2.0, grid);
}

// Linear interpolation along one axis of `size` pixels: weight w_low on pixel `low`, w_high on
// `high`. Coordinates outside [-1, size] are invalid (the sample contributes nothing).
template <typename T>
struct AxisTap {
  int64_t low, high;
  T w_low, w_high;
  bool valid;
};

// Tap of sample i (of `grid`) in bin p along an axis starting at `start` with bins of `bin`,
// weights scaled by 1/(w_low^2 + w_high^2) for kAunet.
template <typename T>
FASTSEG_HOST_DEVICE inline AxisTap<T> sample_tap(T start, T bin, int64_t p, int64_t i,
                                                 int64_t grid, int64_t size, Norm norm) {
  AxisTap<T> t{0, 0, T(0), T(0), false};
  T v = start + static_cast<T>(p) * bin +
        (static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(grid);
  if (v < T(-1) || v > static_cast<T>(size)) return t;
  if (v <= T(0)) v = T(0);
  t.low = static_cast<int64_t>(v);
  if (t.low >= size - 1) {
    t.low = t.high = size - 1;
    v = static_cast<T>(t.low);
  } else {
    t.high = t.low + 1;
  }
  t.w_high = v - static_cast<T>(t.low);
  t.w_low = T(1) - t.w_high;
  if (norm == Norm::kAunet) {
    const T s = T(1) / (t.w_low * t.w_low + t.w_high * t.w_high);  // >= 1/2: never 0
    t.w_low *= s;
    t.w_high *= s;
  }
  t.valid = true;
  return t;
}

// Pixels [lo, hi) touched by the valid samples of bin p (lo == hi: none). Sample coordinates
// are monotone in i, but an aligned RoI with x2 < x1 and a fixed sampling_ratio runs backwards,
// so both ends are checked.
struct PixelRange {
  int64_t lo, hi;
};

template <typename T>
FASTSEG_HOST_DEVICE inline PixelRange bin_range(T start, T bin, int64_t p, int64_t grid,
                                                int64_t size) {
  PixelRange r{0, 0};
  int64_t i0, i1;
  sample_span(start, bin, p, grid, size, &i0, &i1);
  for (int64_t i = i0; i < i1; ++i) {
    const AxisTap<T> t = sample_tap(start, bin, p, i, grid, size, Norm::kCount);
    if (!t.valid) continue;
    if (r.lo == r.hi) {
      r.lo = t.low;
      r.hi = t.high + 1;
    } else {
      r.lo = t.low < r.lo ? t.low : r.lo;
      r.hi = t.high + 1 > r.hi ? t.high + 1 : r.hi;
    }
  }
  return r;
}

// Adds row p of the interpolation matrix, times `scale`, into row[pixel - lo] (row must cover
// bin_range(...) of p, relative to lo).
template <typename T, typename Acc>
FASTSEG_HOST_DEVICE inline void add_bin_row(T start, T bin, int64_t p, int64_t grid, int64_t size,
                                            Norm norm, Acc scale, Acc* row, int64_t lo) {
  int64_t i0, i1;
  sample_span(start, bin, p, grid, size, &i0, &i1);
  for (int64_t i = i0; i < i1; ++i) {
    const AxisTap<T> t = sample_tap(start, bin, p, i, grid, size, norm);
    if (!t.valid) continue;
    row[t.low - lo] += scale * static_cast<Acc>(t.w_low);
    row[t.high - lo] += scale * static_cast<Acc>(t.w_high);
  }
}

}  // namespace fastseg::common
