#pragma once
// fastseg::matrix_nms_decay / matrix_nms_boxes_decay — what the CPU and CUDA kernel files share:
// argument checks (each names the argument it rejects) and the kernel name. The math is in
// ops/common/matrix_nms.h; sorting, filtering and top-k stay in Python (fastseg/ops/nms.py).
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "ops/common/matrix_nms.h"

namespace fastseg::ops {

// masks [n0, H, W] bool/uint8, labels [n0] integer, order [n] int64 (indices into n0),
// mask_area [n0] floating or absent.
void matrix_nms_decay_check(const at::Tensor& masks, const at::Tensor& labels,
                            const at::Tensor& order, const std::optional<at::Tensor>& mask_area,
                            double sigma);
// bits [n0, words] int64 (bit-packed masks, 64 pixels a word), labels [n0] integer, order [n] int64,
// mask_area [n0] floating (required: the packed entry does not count pixels).
void matrix_nms_packed_decay_check(const at::Tensor& bits, const at::Tensor& labels,
                                   const at::Tensor& order, const at::Tensor& mask_area,
                                   double sigma);
// boxes [n0, 4] floating, labels [n0] integer, order [n] int64.
void matrix_nms_boxes_decay_check(const at::Tensor& boxes, const at::Tensor& labels,
                                  const at::Tensor& order, double sigma);
// "gaussian" / "linear"; anything else is an error naming `kernel`.
common::DecayKernel decay_kernel(c10::string_view kernel);

}  // namespace fastseg::ops
