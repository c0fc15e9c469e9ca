#pragma once
// fastseg::roi_align / roi_upsample — what the CPU and CUDA kernel files share: the argument
// checks (each names the argument it rejects) and the mode names. The math is in
// ops/common/roi.h.
//
// Four ops, two kernels per device: roi_align = gather(kCount), its backward = scatter(kCount);
// roi_upsample(mode) = scatter(mode), its backward = gather(mode).
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "ops/common/roi.h"

namespace fastseg::ops {

// features [N, C, H, W], rois [K, 5]; pooled sizes > 0.
void roi_align_check(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h,
                     int64_t pooled_w);
// grad [K, C, pooled_h, pooled_w] with K = rois.size(0); batch_size >= 0, height, width > 0.
void roi_align_backward_check(const at::Tensor& grad, const at::Tensor& rois, int64_t batch_size,
                              int64_t height, int64_t width);
// roi_maps [K, C, m, m'], output [batch_size, C, height, width].
void roi_upsample_check(const at::Tensor& roi_maps, const at::Tensor& rois, int64_t batch_size,
                        int64_t height, int64_t width);
// grad [N, C, H, W]; pooled sizes > 0.
void roi_upsample_backward_check(const at::Tensor& grad, const at::Tensor& rois,
                                 int64_t pooled_h, int64_t pooled_w);
// "adjoint" -> kCount, "aunet" -> kAunet; anything else is an error naming `mode`.
common::Norm roi_upsample_norm(c10::string_view mode);

}  // namespace fastseg::ops
