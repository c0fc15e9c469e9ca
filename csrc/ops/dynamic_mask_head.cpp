// Schema of fastseg::dynamic_mask_head (SOLOv2's dynamic mask prediction, inference only) and its
// device-independent argument checks (declared in ops/dynamic_mask_head.h).
//
// dynamic_mask_head(kernels [n, E], features [E, H, W], mask_thr) -> (masks int64 [n, ceil(H*W/64)]
// bit-packed, areas float32 [n], maskness [n] in the inputs' dtype): the product kernels . features
// is computed tile by tile and never stored; see ops/common/dynamic_mask_head.h for the decision.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "ops/dynamic_mask_head.h"

namespace fastseg::ops {

void dynamic_mask_head_check(const at::Tensor& kernels, const at::Tensor& features,
                             double mask_thr) {
  TORCH_CHECK(kernels.dim() == 2, "kernels must be [n, E], got shape ", kernels.sizes());
  TORCH_CHECK(features.dim() == 3, "features must be [E, H, W], got shape ", features.sizes());
  TORCH_CHECK(at::isFloatingType(kernels.scalar_type()), "kernels must be floating point, got ",
              kernels.scalar_type());
  TORCH_CHECK(features.scalar_type() == kernels.scalar_type(), "features (",
              features.scalar_type(), ") and kernels (", kernels.scalar_type(),
              ") must have the same dtype");
  TORCH_CHECK(features.size(0) == kernels.size(1), "kernels [n, E] and features [E, H, W] disagree "
              "on E: kernels ", kernels.sizes(), ", features ", features.sizes());
  TORCH_CHECK(features.device() == kernels.device(), "features are on ", features.device(),
              " but kernels are on ", kernels.device());
  TORCH_CHECK(!std::isnan(mask_thr), "mask_thr must not be NaN");
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def("dynamic_mask_head(Tensor kernels, Tensor features, float mask_thr) -> (Tensor, Tensor, Tensor)");
}

}  // namespace fastseg::ops
