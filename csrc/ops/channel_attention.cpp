// Schema of fastseg::channel_attention (DANet CAM) and its backward, plus their argument checks.
#include <torch/library.h>

#include "ops/attention.h"

namespace fastseg::ops {

void channel_attention_check(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
}

void channel_attention_backward_check(const at::Tensor& grad_out, const at::Tensor& x) {
  channel_attention_check(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(),
              ", got ", grad_out.sizes());
  check_same_dtype_device(grad_out, "grad_out", x, "x");
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def("channel_attention(Tensor x) -> Tensor");
  m.def("_channel_attention_backward(Tensor grad_out, Tensor x) -> Tensor");
}

}  // namespace fastseg::ops
