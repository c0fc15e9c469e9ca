// Schema of fastseg::separable_conv2d and its backward, plus the device-independent parts.
#include "ops/separable_conv2d.h"

#include <array>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "ops/common/separable_conv.h"

namespace fastseg::ops {

namespace {

void check_affine(const std::optional<at::Tensor>& p, const char* name, int64_t n,
                  const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, name, " must be a 1-D tensor of length ", n,
              ", got shape ", p->sizes());
  TORCH_CHECK(at::isFloatingType(p->scalar_type()), name, " must be floating point, got ",
              p->scalar_type());
  TORCH_CHECK(p->device() == x.device(), name, " is on ", p->device(), " but x is on ",
              x.device());
}

}  // namespace

std::vector<int64_t> separable_conv2d_check(const at::Tensor& x, const at::Tensor& dw_weight,
                                            const at::Tensor& pw_weight,
                                            const std::optional<at::Tensor>& dw_scale,
                                            const std::optional<at::Tensor>& dw_shift,
                                            const std::optional<at::Tensor>& pw_scale,
                                            const std::optional<at::Tensor>& pw_shift,
                                            const SepConvGeometry& g) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(dw_weight.dim() == 4 && dw_weight.size(0) == C && dw_weight.size(1) == 1 &&
                  dw_weight.size(2) == dw_weight.size(3) && dw_weight.size(2) >= 1,
              "dw_weight must be [C, 1, k, k] with C = x.size(1) = ", C, ", got shape ",
              dw_weight.sizes());
  TORCH_CHECK(pw_weight.dim() == 4 && pw_weight.size(1) == C && pw_weight.size(2) == 1 &&
                  pw_weight.size(3) == 1,
              "pw_weight must be [O, C, 1, 1] with C = x.size(1) = ", C, ", got shape ",
              pw_weight.sizes());
  TORCH_CHECK(dw_weight.scalar_type() == x.scalar_type(), "dw_weight dtype ",
              dw_weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(pw_weight.scalar_type() == x.scalar_type(), "pw_weight dtype ",
              pw_weight.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(dw_weight.device() == x.device(), "dw_weight is on ", dw_weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(pw_weight.device() == x.device(), "pw_weight is on ", pw_weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(g.stride >= 1, "stride must be >= 1, got ", g.stride);
  TORCH_CHECK(g.dilation >= 1, "dilation must be >= 1, got ", g.dilation);
  TORCH_CHECK(g.pad_beg >= 0 && g.pad_end >= 0, "padding must be >= 0, got (", g.pad_beg, ", ",
              g.pad_end, ")");
  const int64_t O = pw_weight.size(0);
  check_affine(dw_scale, "dw_scale", C, x);
  check_affine(dw_shift, "dw_shift", C, x);
  check_affine(pw_scale, "pw_scale", O, x);
  check_affine(pw_shift, "pw_shift", O, x);
  const int64_t k = dw_weight.size(2);
  const int64_t Ho = common::conv_out_size(x.size(2), g.pad_beg, g.pad_end, k, g.dilation, g.stride);
  const int64_t Wo = common::conv_out_size(x.size(3), g.pad_beg, g.pad_end, k, g.dilation, g.stride);
  return {x.size(0), O, Ho, Wo};
}

at::Tensor affine_param(const std::optional<at::Tensor>& p, at::ScalarType opmath) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(opmath).contiguous();
}

PointwiseGrads pointwise_backward_matmul(const at::Tensor& g, const at::Tensor& y,
                                         const at::Tensor& w) {
  const int64_t N = g.size(0), O = g.size(1), C = y.size(1), P = g.size(2) * g.size(3);
  const auto g3 = g.view({N, O, P}), y3 = y.view({N, C, P}), w2 = w.view({O, C});
  return {at::matmul(w2.t(), g3).view(y.sizes()),
          at::matmul(g3, y3.transpose(1, 2)).sum(0).view({O, C, 1, 1})};
}

DepthwiseActGrads depthwise_act_backward_composite(const at::Tensor& gy, const at::Tensor& y,
                                                   const at::Tensor& a, const at::Tensor& scale,
                                                   const at::Tensor& shift, bool relu) {
  const std::array<int64_t, 3> batch_pixels{0, 2, 3};
  const auto gb = relu ? at::threshold_backward(gy, y, 0) : gy;  // y > 0 exactly where b > 0
  const auto g_scale = scale.defined() ? (gb * a).sum(batch_pixels) : at::Tensor();
  const auto g_shift = shift.defined() ? gb.sum(batch_pixels) : at::Tensor();
  const auto ga = (scale.defined() ? gb * scale.view({1, -1, 1, 1}) : gb).contiguous();
  return {ga, g_scale, g_shift};
}

SepConvGrads separable_conv2d_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw_weight,
    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_scale,
    const std::optional<at::Tensor>& dw_shift, const std::optional<at::Tensor>& pw_scale,
    const std::optional<at::Tensor>& pw_shift, const SepConvGeometry& g, bool dw_relu, bool relu,
    const DepthwiseKernels& kernels) {
  const auto out_shape =
      separable_conv2d_check(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift, g);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(out_shape), "grad_out must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto opmath = at::toOpMathType(x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), O = pw_weight.size(0), k = dw_weight.size(2);
  const int64_t P = out_shape[2] * out_shape[3];

  const auto xf = x.to(opmath).contiguous();
  const auto dwf = dw_weight.to(opmath).contiguous();
  const auto pwf = pw_weight.to(opmath).contiguous();
  const auto gout = grad_out.to(opmath).contiguous();
  const auto ds = affine_param(dw_scale, opmath), dh = affine_param(dw_shift, opmath);
  const auto ps = affine_param(pw_scale, opmath), ph = affine_param(pw_shift, opmath);
  auto col = [](const at::Tensor& t) { return t.view({1, -1, 1, 1}); };
  // Reduce over batch and pixels. A named array: torch 2.11's headers find sum({0, 2}) ambiguous.
  const std::array<int64_t, 3> batch_pixels{0, 2, 3}, in_channels{1, 2, 3};

  // Recompute the depthwise stage: a (depthwise), y (affine + act).
  const auto a = kernels.forward(xf, dwf, g);
  auto y = ds.defined() && dh.defined() ? at::addcmul(col(dh), a, col(ds))
           : ds.defined()               ? a * col(ds)
           : dh.defined()               ? a + col(dh)
                                        : a;
  if (dw_relu) y = ds.defined() || dh.defined() ? y.clamp_min_(0) : y.clamp_min(0);

  // The pointwise stage is u = w_eff · y + ph with the scale folded into the weight: its
  // gradients give those of pw (G · ps) and of the scale (Σ_c pw ⊙ G, as Σ_p gu·z = Σ_c pw·(Σ_p gu·yᵀ)),
  // so the pointwise result z is needed only for the final ReLU's mask when relu is set here.
  const auto w_eff = ps.defined() ? pwf * ps.view({O, 1, 1, 1}) : pwf;
  auto gu = gout;
  if (relu) {
    auto u = at::matmul(w_eff.view({O, C}), y.view({N, C, P})).view(out_shape);
    if (ph.defined()) u = u + col(ph);
    gu = at::threshold_backward(gout, u, 0);
  }
  auto [gy, G] = kernels.pointwise_backward(gu, y, w_eff);
  const auto g_pw = ps.defined() ? G * ps.view({O, 1, 1, 1}) : G;
  const auto g_ps = ps.defined() ? (G * pwf).sum(in_channels) : at::Tensor();
  const auto g_ph = ph.defined() ? gu.sum(batch_pixels) : at::Tensor();
  const auto [ga, g_ds, g_dh] = kernels.act_backward(gy, y, a, ds, dh, dw_relu);
  const auto g_x = kernels.backward_input(ga, dwf, x.size(2), x.size(3), g);
  const auto g_dw = kernels.backward_weight(ga, xf, k, g);

  auto like = [&](const at::Tensor& grad, const std::optional<at::Tensor>& p) {
    if (!p.has_value() || !p->defined()) return at::empty({0}, x.options());
    return grad.to(p->scalar_type());
  };
  return {g_x.to(x.scalar_type()),
          g_dw.to(dw_weight.scalar_type()),
          g_pw.to(pw_weight.scalar_type()),
          like(g_ds, dw_scale),
          like(g_dh, dw_shift),
          like(g_ps, pw_scale),
          like(g_ph, pw_shift)};
}

namespace {

// Under CUDA autocast the op runs in the autocast dtype (fp16/bf16); it accumulates in fp32.
at::Tensor separable_conv2d_autocast(const at::Tensor& x, const at::Tensor& dw_weight,
                                     const at::Tensor& pw_weight,
                                     const std::optional<at::Tensor>& dw_scale,
                                     const std::optional<at::Tensor>& dw_shift,
                                     const std::optional<at::Tensor>& pw_scale,
                                     const std::optional<at::Tensor>& pw_shift, int64_t stride,
                                     int64_t pad_beg, int64_t pad_end, int64_t dilation,
                                     bool dw_relu, bool relu) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const auto dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  auto cast = [&](const at::Tensor& t) {
    return at::autocast::cached_cast(dtype, t, c10::DeviceType::CUDA);
  };
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastseg::separable_conv2d", "")
                       .typed<decltype(separable_conv2d_autocast)>();
  return op.call(cast(x), cast(dw_weight), cast(pw_weight), dw_scale, dw_shift, pw_scale,
                 pw_shift, stride, pad_beg, pad_end, dilation, dw_relu, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, AutocastCUDA, m) {
  m.impl("separable_conv2d", &separable_conv2d_autocast);
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def(
      "separable_conv2d(Tensor x, Tensor dw_weight, Tensor pw_weight, Tensor? dw_scale, "
      "Tensor? dw_shift, Tensor? pw_scale, Tensor? pw_shift, int stride, int pad_beg, "
      "int pad_end, int dilation, bool dw_relu, bool relu) -> Tensor");
  m.def(
      "_separable_conv2d_backward(Tensor grad_out, Tensor x, Tensor dw_weight, Tensor pw_weight, "
      "Tensor? dw_scale, Tensor? dw_shift, Tensor? pw_scale, Tensor? pw_shift, int stride, "
      "int pad_beg, int pad_end, int dilation, bool dw_relu, bool relu) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace fastseg::ops
