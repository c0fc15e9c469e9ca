// Schemas of fastseg::roi_align, fastseg::roi_upsample and their backwards, plus the
// device-independent argument checks (declared in ops/roi_align.h).
//
// roi_align is torchvision.ops.roi_align. roi_upsample scatters per-RoI maps back onto the image
// along RoIAlign's sample grid: mode "adjoint" is the exact transpose of roi_align (= its input
// gradient), mode "aunet" renormalises each sample's 4 weights by 1/sum(w^2) with no /count.
// The backward of each op is the exact adjoint of its forward: roi_align <-> scatter(count),
// roi_upsample(mode) <-> gather(mode).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/roi_align.h"

namespace fastseg::ops {

namespace {

void check_data(const at::Tensor& x, const char* name, const char* layout) {
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D ", layout, ", got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating point, got ",
              x.scalar_type());
}

// rois [K, 5] on x's device, of any floating dtype: the kernels read them in float32 (float64 for
// float64 x), never in x's dtype when that is float16/bfloat16 (a box edge at 1000.3 would move
// to 1000 in bfloat16). On CPU the values must be finite and the batch indices (truncated toward
// zero, as the kernels read them) must lie in [0, batch_size); for device tensors that check
// would cost a synchronisation, so it is left out (the kernels skip non-finite RoIs and bad
// indices: ops/common/roi.h).
void check_rois(const at::Tensor& rois, const at::Tensor& x, const char* x_name,
                int64_t batch_size) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "rois must be [K, 5] (batch_idx, x1, y1, x2, y2), got shape ", rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), "rois must be floating point, got ",
              rois.scalar_type());
  TORCH_CHECK(rois.device() == x.device(), "rois is on ", rois.device(), " but ", x_name,
              " is on ", x.device());
  if (rois.size(0) == 0 || !rois.device().is_cpu()) return;
  at::AutoDispatchBelowADInplaceOrView guard;
  // A non-finite coordinate would turn into an unbounded sample grid.
  TORCH_CHECK(rois.isfinite().all().item<bool>(), "rois must be finite, got NaN or inf");
  const auto b = rois.select(1, 0).to(at::kLong);
  const int64_t lo = b.min().item<int64_t>(), hi = b.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < batch_size, "rois[:, 0] (batch index) must lie in [0, ",
              batch_size, "), got values in [", lo, ", ", hi, "]");
}

void check_pooled(int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, "pooled_h and pooled_w must be > 0, got (", pooled_h,
              ", ", pooled_w, ")");
}

void check_size(int64_t batch_size, int64_t height, int64_t width) {
  TORCH_CHECK(batch_size >= 0, "batch_size must be >= 0, got ", batch_size);
  TORCH_CHECK(height > 0 && width > 0, "height and width must be > 0, got (", height, ", ", width,
              ")");
}

}  // namespace

void roi_align_check(const at::Tensor& features, const at::Tensor& rois, int64_t pooled_h,
                     int64_t pooled_w) {
  check_data(features, "features", "[N, C, H, W]");
  TORCH_CHECK(features.size(2) > 0 && features.size(3) > 0,
              "features must have H, W > 0, got shape ", features.sizes());
  check_pooled(pooled_h, pooled_w);
  check_rois(rois, features, "features", features.size(0));
}

void roi_align_backward_check(const at::Tensor& grad, const at::Tensor& rois, int64_t batch_size,
                              int64_t height, int64_t width) {
  check_data(grad, "grad", "[K, C, pooled_h, pooled_w]");
  check_size(batch_size, height, width);
  check_rois(rois, grad, "grad", batch_size);
  TORCH_CHECK(grad.size(0) == rois.size(0), "grad.size(0) must equal the number of rois ",
              rois.size(0), ", got shape ", grad.sizes());
}

void roi_upsample_check(const at::Tensor& roi_maps, const at::Tensor& rois, int64_t batch_size,
                        int64_t height, int64_t width) {
  check_data(roi_maps, "roi_maps", "[K, C, m, m']");
  TORCH_CHECK(roi_maps.size(2) > 0 && roi_maps.size(3) > 0,
              "roi_maps must have non-empty maps [K, C, m, m'], got shape ", roi_maps.sizes());
  check_size(batch_size, height, width);
  check_rois(rois, roi_maps, "roi_maps", batch_size);
  TORCH_CHECK(roi_maps.size(0) == rois.size(0),
              "roi_maps.size(0) must equal the number of rois ", rois.size(0), ", got shape ",
              roi_maps.sizes());
}

void roi_upsample_backward_check(const at::Tensor& grad, const at::Tensor& rois,
                                 int64_t pooled_h, int64_t pooled_w) {
  check_data(grad, "grad", "[N, C, H, W]");
  TORCH_CHECK(grad.size(2) > 0 && grad.size(3) > 0, "grad must have H, W > 0, got shape ",
              grad.sizes());
  check_pooled(pooled_h, pooled_w);
  check_rois(rois, grad, "grad", grad.size(0));
}

common::Norm roi_upsample_norm(c10::string_view mode) {
  if (mode == "adjoint") return common::Norm::kCount;
  if (mode == "aunet") return common::Norm::kAunet;
  TORCH_CHECK(false, "mode must be \"adjoint\" or \"aunet\", got \"", std::string(mode), "\"");
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def(
      "roi_align(Tensor features, Tensor rois, int pooled_h, int pooled_w, float spatial_scale, "
      "int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, int batch_size, int height, int width, "
      "float spatial_scale, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "roi_upsample(Tensor roi_maps, Tensor rois, int batch_size, int height, int width, "
      "float spatial_scale, int sampling_ratio, bool aligned, str mode) -> Tensor");
  m.def(
      "_roi_upsample_backward(Tensor grad, Tensor rois, int pooled_h, int pooled_w, "
      "float spatial_scale, int sampling_ratio, bool aligned, str mode) -> Tensor");
}

}  // namespace fastseg::ops
