#pragma once
// fastseg::dense_crf — what the CPU and CUDA kernel files share: the argument checks (each names
// the argument it rejects). The lattice math is in ops/common/permutohedral.h.
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

}  // namespace fastseg::ops
