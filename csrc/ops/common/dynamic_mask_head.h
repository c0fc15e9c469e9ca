#pragma once
// SOLOv2 dynamic mask head (fastseg::dynamic_mask_head): what the CPU and CUDA kernels share.
//
// A pixel is in a mask iff its logit x = kernel . feature (accumulated in float32, or float64 for
// float64 inputs) exceeds logit(mask_thr) = log(t / (1 - t)): in exact arithmetic that is
// sigmoid(x) > mask_thr, strictly (a pixel exactly at the threshold is out; x = 0 at 0.5). Comparing
// logits needs no exp for the decision, and every backend compares against the same threshold.
#include "ops/common/macros.h"

#include <cmath>
#include <limits>

namespace fastseg::common {

// logit(thr): -inf for thr <= 0 (every finite logit is in), +inf for thr >= 1 (none is).
inline double mask_logit_threshold(double thr) {
  if (!(thr > 0.0)) return -std::numeric_limits<double>::infinity();
  if (thr >= 1.0) return std::numeric_limits<double>::infinity();
  return std::log(thr) - std::log1p(-thr);
}

// The float t with (x > t) <=> (x > lt) for every float x: lt rounded toward -inf.
inline float mask_logit_threshold_f(double lt) {
  float t = static_cast<float>(lt);
  if (static_cast<double>(t) > lt) t = std::nextafter(t, -std::numeric_limits<float>::infinity());
  return t;
}

// Packed masks: 64 pixels per int64 word, bit b of word w is pixel 64 w + b (row-major H*W), the
// packing of Matrix NMS (ops/cpu/matrix_nms_kernel.cpp); bits past H*W are 0.
FASTSEG_HOST_DEVICE inline long long mask_words(long long hw) { return (hw + 63) / 64; }

}  // namespace fastseg::common
