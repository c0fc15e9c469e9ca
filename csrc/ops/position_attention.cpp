// Schema of fastseg::position_attention (DANet PAM) and its backward, plus their argument checks.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "ops/attention.h"

namespace fastseg::ops {

void position_attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "q must be 4-D [B, Ck, H, W], got shape ", q.sizes());
  TORCH_CHECK(v.dim() == 4, "v must be 4-D [B, C, H, W], got shape ", v.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "q and k must have the same shape, got ", q.sizes(),
              " and ", k.sizes());
  TORCH_CHECK(v.size(0) == q.size(0), "v has batch ", v.size(0), " but q has batch ", q.size(0));
  TORCH_CHECK(v.sizes().slice(2) == q.sizes().slice(2), "spatial mismatch: q is ",
              q.sizes().slice(2), " but v is ", v.sizes().slice(2));
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "q must be floating point, got ",
              q.scalar_type());
  check_same_dtype_device(k, "k", q, "q");
  check_same_dtype_device(v, "v", q, "q");
}

void position_attention_backward_check(const at::Tensor& grad_out, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse) {
  position_attention_check(q, k, v);
  TORCH_CHECK(grad_out.sizes() == v.sizes(), "grad_out must have the shape of v ", v.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == v.sizes(), "out must have the shape of v ", v.sizes(), ", got ",
              out.sizes());
  check_same_dtype_device(grad_out, "grad_out", v, "v");
  check_same_dtype_device(out, "out", v, "v");
  const int64_t B = q.size(0), N = q.size(2) * q.size(3);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == B && lse.size(1) == N, "lse must be [B, H * W] = [",
              B, ", ", N, "], got shape ", lse.sizes());
  const auto opmath = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == opmath, "lse must be ", opmath, " (the opmath dtype of q), got ",
              lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  // lse [B, H * W] is the per-query log-sum-exp of the energies (opmath dtype), kept for the backward.
  m.def("position_attention(Tensor q, Tensor k, Tensor v) -> (Tensor out, Tensor lse)");
  m.def(
      "_position_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

}  // namespace fastseg::ops
