#pragma once
// Index math of ESPNet's pyramid of dilated 3x3 convolutions (fastseg::esp_pyramid), shared by
// the CPU and CUDA kernels.
//
// The K branch weights are packed along the output-channel axis: branch 0 owns rows [0, d1), branch
// k >= 1 owns rows [d1 + (k - 1) d, d1 + k d). The output uses the same channel layout, so a
// branch's weight rows and the output channels of its hierarchical sum coincide.
#include <cstdint>

#include "ops/common/macros.h"

namespace fastseg::common {

// First packed row (= output channel) of branch k.
FASTSEG_HOST_DEVICE inline int64_t esp_branch_start(int64_t k, int64_t d1, int64_t d) {
  return k == 0 ? 0 : d1 + (k - 1) * d;
}

// Rows (= output channels) of branch k.
FASTSEG_HOST_DEVICE inline int64_t esp_branch_width(int64_t k, int64_t d1, int64_t d) {
  return k == 0 ? d1 : d;
}

// Branch owning packed row (= output channel) r.
FASTSEG_HOST_DEVICE inline int64_t esp_branch_of(int64_t r, int64_t d1, int64_t d) {
  return r < d1 ? 0 : 1 + (r - d1) / d;
}

// Input coordinate read by output coordinate o at tap t in {0, 1, 2} of a 3x3 conv with
// dilation dil and padding dil (the size is kept).
FASTSEG_HOST_DEVICE inline int64_t esp_tap(int64_t o, int64_t t, int64_t dil) {
  return o + (t - 1) * dil;
}

}  // namespace fastseg::common
