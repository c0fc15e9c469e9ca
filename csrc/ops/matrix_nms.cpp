// Schemas of fastseg::matrix_nms_decay, fastseg::matrix_nms_packed_decay (masks given bit-packed,
// 64 pixels a word, with their areas) and fastseg::matrix_nms_boxes_decay (the O(n^2) core of
// Matrix NMS) and their device-independent argument checks (declared in ops/matrix_nms.h).
//
// All return, for the masks (boxes) order[0..n) taken in that order (score-descending within
// each label), the float64 decay factor of each (ops/common/matrix_nms.h). Labels group the
// pairs: a batch of images runs as one call with labels made unique per image.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/matrix_nms.h"

namespace fastseg::ops {

namespace {

void check_common(const at::Tensor& x, const char* x_name, const at::Tensor& labels,
                  const at::Tensor& order, double sigma) {
  const int64_t n0 = x.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n0, "labels must be [", n0,
              "] (one per ", x_name, "), got shape ", labels.sizes());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && labels.scalar_type() != at::kBool,
              "labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kLong && order.size(0) <= n0,
              "order must be a 1-D int64 tensor of at most ", n0, " indices, got ",
              order.scalar_type(), " of shape ", order.sizes());
  TORCH_CHECK(sigma > 0.0, "sigma must be > 0, got ", sigma);
  for (const auto* t : {&labels, &order})
    TORCH_CHECK(t->device() == x.device(), "all inputs must be on ", x.device(), ", got ",
                t->device());
  if (order.numel() > 0 && order.device().is_cpu()) {  // device tensors: checking would sync
    TORCH_CHECK(order.min().item<int64_t>() >= 0 && order.max().item<int64_t>() < n0,
                "order must index [0, ", n0, ")");
  }
}

void check_area(const at::Tensor& masks, const std::optional<at::Tensor>& mask_area) {
  if (mask_area.has_value()) {
    TORCH_CHECK(mask_area->dim() == 1 && mask_area->size(0) == masks.size(0),
                "mask_area must be [", masks.size(0), "], got shape ", mask_area->sizes());
    TORCH_CHECK(at::isFloatingType(mask_area->scalar_type()),
                "mask_area must be floating point, got ", mask_area->scalar_type());
    TORCH_CHECK(mask_area->device() == masks.device(), "mask_area is on ", mask_area->device(),
                " but masks are on ", masks.device());
  }
}

}  // namespace

void matrix_nms_decay_check(const at::Tensor& masks, const at::Tensor& labels,
                            const at::Tensor& order, const std::optional<at::Tensor>& mask_area,
                            double sigma) {
  TORCH_CHECK(masks.dim() == 3, "masks must be [n, H, W], got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte,
              "masks must be bool or uint8 (threshold float masks first), got ",
              masks.scalar_type());
  check_common(masks, "mask", labels, order, sigma);
  check_area(masks, mask_area);
}

void matrix_nms_packed_decay_check(const at::Tensor& bits, const at::Tensor& labels,
                                   const at::Tensor& order, const at::Tensor& mask_area,
                                   double sigma) {
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kLong,
              "masks must be int64 [n, words] (bit-packed), got ", bits.scalar_type(), " of shape ",
              bits.sizes());
  check_common(bits, "mask", labels, order, sigma);
  check_area(bits, mask_area);
}

void matrix_nms_boxes_decay_check(const at::Tensor& boxes, const at::Tensor& labels,
                                  const at::Tensor& order, double sigma) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "boxes must be [n, 4], got shape ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), "boxes must be floating point, got ",
              boxes.scalar_type());
  check_common(boxes, "box", labels, order, sigma);
}

common::DecayKernel decay_kernel(c10::string_view kernel) {
  if (kernel == "gaussian") return common::DecayKernel::kGaussian;
  if (kernel == "linear") return common::DecayKernel::kLinear;
  TORCH_CHECK(false, "kernel must be \"gaussian\" or \"linear\", got \"", std::string(kernel),
              "\"");
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def(
      "matrix_nms_decay(Tensor masks, Tensor labels, Tensor order, Tensor? mask_area, "
      "str kernel, float sigma) -> Tensor");
  m.def(
      "matrix_nms_packed_decay(Tensor masks, Tensor labels, Tensor order, Tensor mask_area, "
      "str kernel, float sigma) -> Tensor");
  m.def(
      "matrix_nms_boxes_decay(Tensor boxes, Tensor labels, Tensor order, str kernel, "
      "float sigma) -> Tensor");
}

}  // namespace fastseg::ops
