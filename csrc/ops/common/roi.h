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

namespace fastseg::common {

// How a sample's bilinear weights are normalised: by the number of samples in the bin (RoIAlign
// and its transpose, roi_upsample mode="adjoint") or by their sum of squares (mode="aunet").
enum class Norm : int { kCount = 0, kAunet = 1 };

// One RoI's sample grid; roi points at (batch_idx, x1, y1, x2, y2) in input coordinates.
template <typename T>
struct RoiGeometry {
  int64_t batch;           // image index (truncated toward zero, as torchvision reads it)
  T start_h, start_w;      // top-left corner in feature coordinates
  T bin_h, bin_w;          // size of one output bin
  int64_t grid_h, grid_w;  // samples per bin along each axis (0: the RoI has no samples)
  T count;                 // max(grid_h * grid_w, 1): the kCount normaliser
};

template <typename T>
FASTSEG_HOST_DEVICE inline RoiGeometry<T> roi_geometry(const T* roi, T spatial_scale,
                                                       int64_t pooled_h, int64_t pooled_w,
                                                       int64_t sampling_ratio, bool aligned) {
  RoiGeometry<T> g;
  g.batch = static_cast<int64_t>(roi[0]);
  const T offset = aligned ? T(0.5) : T(0);
  g.start_w = roi[1] * spatial_scale - offset;
  g.start_h = roi[2] * spatial_scale - offset;
  T roi_w = roi[3] * spatial_scale - offset - g.start_w;
  T roi_h = roi[4] * spatial_scale - offset - g.start_h;
  if (!aligned) {  // legacy RoIAlign: malformed RoIs are forced to 1 x 1
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  const int64_t gh = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(g.bin_h));
  const int64_t gw = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(ceil(g.bin_w));
  const int64_t n = gh * gw;
  g.count = static_cast<T>(n > 1 ? n : 1);
  // An inverted aligned RoI has a non-positive adaptive grid: torchvision's loops run 0 times.
  g.grid_h = gh > 0 ? gh : 0;
  g.grid_w = gw > 0 ? gw : 0;
  return g;
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
  for (int64_t i = 0; i < grid; ++i) {
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
  for (int64_t i = 0; i < grid; ++i) {
    const AxisTap<T> t = sample_tap(start, bin, p, i, grid, size, norm);
    if (!t.valid) continue;
    row[t.low - lo] += scale * static_cast<Acc>(t.w_low);
    row[t.high - lo] += scale * static_cast<Acc>(t.w_high);
  }
}

}  // namespace fastseg::common
