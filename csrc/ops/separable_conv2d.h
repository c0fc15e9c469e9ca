#pragma once
// fastseg::separable_conv2d — what the CPU and CUDA kernel files share: argument checks,
// the output shape, and the backward, which composes a device's depthwise kernels with GEMMs.
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

namespace fastseg::ops {

struct SepConvGeometry {
  int64_t stride, pad_beg, pad_end, dilation;
};

// Checks every argument (naming it in the error) and returns the output shape [N, O, Ho, Wo].
std::vector<int64_t> separable_conv2d_check(const at::Tensor& x, const at::Tensor& dw_weight,
                                            const at::Tensor& pw_weight,
                                            const std::optional<at::Tensor>& dw_scale,
                                            const std::optional<at::Tensor>& dw_shift,
                                            const std::optional<at::Tensor>& pw_scale,
                                            const std::optional<at::Tensor>& pw_shift,
                                            const SepConvGeometry& g);

// The per-channel affine parameter as a contiguous opmath-typed tensor (undefined when absent).
at::Tensor affine_param(const std::optional<at::Tensor>& p, at::ScalarType opmath);

using PointwiseGrads = std::tuple<at::Tensor, at::Tensor>;

// Gradients of the pointwise stage u = w · y (w [O, C, 1, 1], y [N, C, Ho, Wo], g = dL/du
// [N, O, Ho, Wo], all contiguous): (wᵀ·g [N, C, Ho, Wo], Σ g·yᵀ [O, C, 1, 1]), through at::matmul
// (BLAS / cuBLAS).
PointwiseGrads pointwise_backward_matmul(const at::Tensor& g, const at::Tensor& y,
                                         const at::Tensor& w);

// The backward of the depthwise affine + ReLU y = act(a · scale + shift) (a, y, gy = dL/dy
// [N, C, Ho, Wo] contiguous; scale, shift [C] or undefined): (dL/da, dL/dscale, dL/dshift), the
// last two undefined where the parameter is; through at:: ops.
using DepthwiseActGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
DepthwiseActGrads depthwise_act_backward_composite(const at::Tensor& gy, const at::Tensor& y,
                                                   const at::Tensor& a, const at::Tensor& scale,
                                                   const at::Tensor& shift, bool relu);

// Primitives a device provides to the backward. All tensors contiguous NCHW of one dtype.
struct DepthwiseKernels {
  // a[n,c,o] = sum_t x[n,c,tap(o,t)] * w[c,t]            -> [N, C, Ho, Wo]
  at::Tensor (*forward)(const at::Tensor& x, const at::Tensor& w, const SepConvGeometry& g);
  // the transpose of forward with respect to x             -> [N, C, H, W]
  at::Tensor (*backward_input)(const at::Tensor& grad, const at::Tensor& w, int64_t H, int64_t W,
                               const SepConvGeometry& g);
  // the transpose of forward with respect to w             -> [C, 1, k, k]
  at::Tensor (*backward_weight)(const at::Tensor& grad, const at::Tensor& x, int64_t k,
                                const SepConvGeometry& g);
  // the pointwise stage's gradients, as pointwise_backward_matmul
  PointwiseGrads (*pointwise_backward)(const at::Tensor& g, const at::Tensor& y,
                                       const at::Tensor& w) = pointwise_backward_matmul;
  // the depthwise affine + ReLU's backward, as depthwise_act_backward_composite
  DepthwiseActGrads (*act_backward)(const at::Tensor& gy, const at::Tensor& y, const at::Tensor& a,
                                    const at::Tensor& scale, const at::Tensor& shift,
                                    bool relu) = depthwise_act_backward_composite;
};

using SepConvGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Backward of separable_conv2d, everything in opmath precision: recomputes the depthwise stage
// (not the pointwise one unless `relu` is set: autograd passes grad_out already masked by the final
// ReLU, with relu = false); the pointwise gradients come from kernels.pointwise_backward with the
// pointwise scale folded into the weight. Absent affines get empty grads.
SepConvGrads separable_conv2d_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw_weight,
    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_scale,
    const std::optional<at::Tensor>& dw_shift, const std::optional<at::Tensor>& pw_scale,
    const std::optional<at::Tensor>& pw_shift, const SepConvGeometry& g, bool dw_relu, bool relu,
    const DepthwiseKernels& kernels);

}  // namespace fastseg::ops
