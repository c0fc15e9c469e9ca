#pragma once
// Argument checks of DANet's attention ops, fastseg::position_attention (PAM) and
// fastseg::channel_attention (CAM). Defined next to the schemas (csrc/ops/<op>.cpp); every backend
// runs them before it touches data, so a bad call fails the same way on any device.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastseg::ops {

// q, k [B, Ck, H, W] and v [B, C, H, W] of one floating dtype, on one device.
void position_attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// The above, plus grad_out and out shaped like v and lse [B, H * W] in q's opmath dtype.
void position_attention_backward_check(const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse);

// x [B, C, H, W], floating.
void channel_attention_check(const at::Tensor& x);

// The above, plus grad_out shaped like x.
void channel_attention_backward_check(const at::Tensor& grad_out, const at::Tensor& x);

// `t` has the dtype and the device of `ref`; the error names both arguments.
inline void check_same_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                                    const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " dtype ", t.scalar_type(),
              " differs from ", ref_name, " dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

}  // namespace fastseg::ops
