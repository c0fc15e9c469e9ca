#pragma once
// fastseg::dense_crf — what the CPU and CUDA kernel files share: the argument checks (each names
// the argument it rejects) and the parameters. The lattice math is in ops/common/permutohedral.h.
#include <ATen/core/Tensor.h>

namespace fastseg::ops {

// unary [N, C, H, W] float32 energies, image [N, 3, H, W] float32 (0..255) of the same N, H, W
// and device; iterations >= 0; pos_sxy, bi_sxy, bi_srgb > 0.
void dense_crf_check(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                     double pos_sxy, double bi_sxy, double bi_srgb);
// dense_crf_check plus grad [N, C, H, W] float32 like unary.
void dense_crf_backward_check(const at::Tensor& grad, const at::Tensor& unary,
                              const at::Tensor& image, int64_t iterations, double pos_sxy,
                              double bi_sxy, double bi_srgb);

// The lattice coordinates (< 2 (D+1)^2 |feature| for D <= 5) must fit an int32: the image
// finite, max |image| / bi_srgb and max(H, W) / pos_sxy, / bi_sxy below 1e6. Reads the image
// (a synchronisation on a GPU).
void dense_crf_lattice_check(const at::Tensor& image, double pos_sxy, double bi_sxy,
                             double bi_srgb);

// The parameters as the kernels use them: float32, as pydensecrf.
struct DenseCrfParams {
  int64_t iterations;
  float pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat;
};

inline DenseCrfParams dense_crf_params(int64_t iterations, double pos_sxy, double pos_compat,
                                       double bi_sxy, double bi_srgb, double bi_compat) {
  return {iterations,
          static_cast<float>(pos_sxy),
          static_cast<float>(pos_compat),
          static_cast<float>(bi_sxy),
          static_cast<float>(bi_srgb),
          static_cast<float>(bi_compat)};
}

}  // namespace fastseg::ops
