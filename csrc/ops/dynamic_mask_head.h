#pragma once
// fastseg::dynamic_mask_head — the argument checks the CPU and CUDA kernel files share (each names
// the argument it rejects). Math: ops/common/dynamic_mask_head.h.
#include <ATen/core/Tensor.h>

namespace fastseg::ops {

// kernels [n, E] floating, features [E, H, W] of the same dtype and device, mask_thr not NaN.
void dynamic_mask_head_check(const at::Tensor& kernels, const at::Tensor& features,
                             double mask_thr);

}  // namespace fastseg::ops
