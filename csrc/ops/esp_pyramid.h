#pragma once
// fastseg::esp_pyramid — what the CPU and CUDA kernel files share: the argument checks (each names
// the argument it rejects) and the branch layout. Index math: ops/common/esp_pyramid.h.
#include <ATen/core/Tensor.h>

#include <vector>

namespace fastseg::ops {

struct EspGeometry {
  int64_t N, C, H, W;  // input x [N, C, H, W]
  int64_t D, d1, d, K;  // packed weight [D, C, 3, 3]: branch 0 has d1 rows, the K - 1 others d
};

// Checks x [N, C, H, W], weight [D, C, 3, 3] (K branches packed: the first has first_channels
// rows, the others (D - first_channels) / (K - 1) each), dilations (K values >= 1).
EspGeometry esp_pyramid_check(const at::Tensor& x, const at::Tensor& weight, int64_t first_channels,
                              at::IntArrayRef dilations);

}  // namespace fastseg::ops
