// Schemas of fastseg::dense_crf and fastseg::_dense_crf_backward, plus the device-independent
// argument checks (declared in ops/dense_crf.h).
//
// dense_crf is pydensecrf's DenseCRF2D + addPairwiseGaussian(pos_sxy, pos_compat) +
// addPairwiseBilateral(bi_sxy, bi_srgb, image, bi_compat) + inference(iterations): Potts
// compatibility, diagonal kernels, symmetric normalisation, filtered with the permutohedral
// lattice. Per image, with U the unary energies [C, P] and M = sum_k compat_k D_k^-1/2 K_k D_k^-1/2
// (D_k = K_k 1):
//     Q_0 = softmax_c(-U),   Q_t = softmax_c(-U + M Q_{t-1}),   returns Q_T.
// _dense_crf_backward returns dL/dU given dL/dQ_T (through the whole trajectory).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "ops/dense_crf.h"

namespace fastseg::ops {

namespace {

void check_params(int64_t iterations, double pos_sxy, double bi_sxy, double bi_srgb) {
  TORCH_CHECK(iterations >= 0, "iterations must be >= 0, got ", iterations);
  // x > 0 is false for NaN, so NaN is rejected too.
  TORCH_CHECK(pos_sxy > 0 && std::isfinite(pos_sxy), "pos_sxy must be a finite number > 0, got ",
              pos_sxy);
  TORCH_CHECK(bi_sxy > 0 && std::isfinite(bi_sxy), "bi_sxy must be a finite number > 0, got ",
              bi_sxy);
  TORCH_CHECK(bi_srgb > 0 && std::isfinite(bi_srgb), "bi_srgb must be a finite number > 0, got ",
              bi_srgb);
}

}  // namespace

void dense_crf_check(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                     double pos_sxy, double bi_sxy, double bi_srgb) {
  TORCH_CHECK(unary.dim() == 4, "unary must be 4-D [N, C, H, W], got shape ", unary.sizes());
  TORCH_CHECK(unary.scalar_type() == at::kFloat, "unary must be float32, got ",
              unary.scalar_type());
  TORCH_CHECK(image.dim() == 4 && image.size(1) == 3, "image must be [N, 3, H, W], got shape ",
              image.sizes());
  TORCH_CHECK(image.scalar_type() == at::kFloat, "image must be float32 (0..255), got ",
              image.scalar_type());
  TORCH_CHECK(image.size(0) == unary.size(0) && image.size(2) == unary.size(2) &&
                  image.size(3) == unary.size(3),
              "image ", image.sizes(), " and unary ", unary.sizes(),
              " differ in batch size or spatial size");
  TORCH_CHECK(image.device() == unary.device(), "image is on ", image.device(),
              " but unary is on ", unary.device());
  check_params(iterations, pos_sxy, bi_sxy, bi_srgb);
}

void dense_crf_lattice_check(const at::Tensor& image, double pos_sxy, double bi_sxy,
                             double bi_srgb) {
  constexpr double kMaxFeature = 1.0e6;
  if (image.numel() == 0) return;
  at::AutoDispatchBelowADInplaceOrView guard;
  const double peak = image.abs().max().item<double>();  // NaN if any value is NaN
  TORCH_CHECK(std::isfinite(peak), "image must be finite, got NaN or inf");
  const double extent = static_cast<double>(std::max(image.size(2), image.size(3)));
  TORCH_CHECK(peak / bi_srgb < kMaxFeature,
              "image / bi_srgb is too large for the lattice: max |image| = ", peak,
              ", bi_srgb = ", bi_srgb);
  TORCH_CHECK(extent / pos_sxy < kMaxFeature && extent / bi_sxy < kMaxFeature,
              "image size / pos_sxy or bi_sxy is too large for the lattice: pos_sxy = ", pos_sxy,
              ", bi_sxy = ", bi_sxy);
}

void dense_crf_backward_check(const at::Tensor& grad, const at::Tensor& unary,
                              const at::Tensor& image, int64_t iterations, double pos_sxy,
                              double bi_sxy, double bi_srgb) {
  dense_crf_check(unary, image, iterations, pos_sxy, bi_sxy, bi_srgb);
  TORCH_CHECK(grad.sizes() == unary.sizes(), "grad must have unary's shape ", unary.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat, "grad must be float32, got ", grad.scalar_type());
  TORCH_CHECK(grad.device() == unary.device(), "grad is on ", grad.device(), " but unary is on ",
              unary.device());
}

TORCH_LIBRARY_FRAGMENT(fastseg, m) {
  m.def(
      "dense_crf(Tensor unary, Tensor image, int iterations, float pos_sxy, float pos_compat, "
      "float bi_sxy, float bi_srgb, float bi_compat) -> Tensor");
  m.def(
      "_dense_crf_backward(Tensor grad, Tensor unary, Tensor image, int iterations, "
      "float pos_sxy, float pos_compat, float bi_sxy, float bi_srgb, float bi_compat) -> Tensor");
}

}  // namespace fastseg::ops
