// Schema of fastseg::esp_pyramid and its backward, plus the device-independent argument checks.
#include "ops/esp_pyramid.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

namespace fastseg::ops {

EspGeometry esp_pyramid_check(const at::Tensor& x, const at::Tensor& weight, int64_t first_channels,
                              at::IntArrayRef dilations) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
  const int64_t C = x.size(1), D = weight.dim() > 0 ? weight.size(0) : 0;
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "weight must be [D, C, 3, 3] with C = x.size(1) = ", C, ", got shape ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "weight is on ", weight.device(), " but x is on ",
              x.device());
  const int64_t K = static_cast<int64_t>(dilations.size());
  TORCH_CHECK(K >= 1, "dilations must name at least one branch");
  for (const int64_t dil : dilations) TORCH_CHECK(dil >= 1, "dilations must be >= 1, got ", dilations);
  TORCH_CHECK(first_channels >= 1 && first_channels <= D, "first_channels must be in [1, ", D,
              "], got ", first_channels);
  const int64_t rest = D - first_channels;
  TORCH_CHECK(K > 1 ? rest > 0 && rest % (K - 1) == 0 : rest == 0, "weight has ", D,
              " rows: ", first_channels, " for the first branch leaves ", rest,
              ", which does not split into len(dilations) - 1 = ", K - 1, " equal branches");
  return {x.size(0), C, x.size(2), x.size(3), D, first_channels, K > 1 ? rest / (K - 1) : 0, K};
}

namespace {

// Under CUDA autocast the op runs in the autocast dtype (fp16/bf16); it accumulates in fp32.
at::Tensor esp_pyramid_autocast(const at::Tensor& x, const at::Tensor& weight,
                                int64_t first_channels, at::IntArrayRef dilations) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  auto cast = [&](const at::Tensor& t) {
    return at::autocast::cached_cast(dtype, t, c10::DeviceType::CUDA);
  };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastseg::esp_pyramid", "")
                       .typed<decltype(esp_pyramid_autocast)>();
  return op.call(cast(x), cast(weight), first_channels, dilations);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, AutocastCUDA, m) { m.impl("esp_pyramid", &esp_pyramid_autocast); }

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def("esp_pyramid(Tensor x, Tensor weight, int first_channels, int[] dilations) -> Tensor");
  m.def(
      "_esp_pyramid_backward(Tensor grad_out, Tensor x, Tensor weight, int first_channels, "
      "int[] dilations) -> (Tensor, Tensor)");
}

}  // namespace fastseg::ops
