#pragma once
// Matrix NMS (SOLOv2) decay math, shared by the CPU and CUDA kernels of fastseg::matrix_nms_decay
// and fastseg::matrix_nms_boxes_decay.
//
// In score order, mask j is decayed by every higher-scored mask i of its label:
//     decay_j = min(1, min_{i before j, same label} f(iou_ij) / f(comp_i)),
//     comp_i  = max_{k before i, same label} iou_ki          (0 for the first of a label),
// with f(x) = exp(-sigma x^2) (gaussian) or 1 - x (linear). This is mmdet's mask_matrix_nms: its
// min over the whole column also sees f(0)/f(comp_i) >= 1 for the other pairs and exactly 1 for
// the top mask, hence the min(1, .). All of it runs in double: every backend then takes the same
// decisions (the intersections themselves are exact integer counts).
#include "ops/common/macros.h"

#include <cmath>
#include <cstdint>

namespace fastseg::common {

enum class DecayKernel : int { kGaussian = 0, kLinear = 1 };

FASTSEG_HOST_DEVICE inline double decay_f(double iou, DecayKernel kernel, double sigma) {
  return kernel == DecayKernel::kGaussian ? exp(-sigma * iou * iou) : 1.0 - iou;
}

// inter / union; 0 when the union is empty (two empty masks: mmdet would divide 0 by 0).
FASTSEG_HOST_DEVICE inline double iou_of(double inter, double area_a, double area_b) {
  const double uni = area_a + area_b - inter;
  return uni > 0.0 ? inter / uni : 0.0;
}

// The decay higher-scored mask i (compensation comp_i) applies to j at IoU iou_ij. A mask that was
// itself fully suppressed (f(comp_i) == 0: linear kernel, a duplicate of a higher mask) applies
// none: mmdet computes 0/0 there, yet j is then a duplicate of that higher mask too and decays
// through it.
FASTSEG_HOST_DEVICE inline double pair_decay(double iou, double comp, DecayKernel kernel,
                                             double sigma) {
  const double den = decay_f(comp, kernel, sigma);
  return den > 0.0 ? decay_f(iou, kernel, sigma) / den : 1.0;
}

// A product rounded on its own: nvcc would otherwise contract a * b + c into an FMA, and box IoU
// would differ from the CPU's (plain x86-64, no FMA) by an ulp in some pairs.
FASTSEG_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// IoU of boxes (x1, y1, x2, y2) as torchvision.ops.box_iou (no +1; degenerate boxes have area 0).
template <typename T>
FASTSEG_HOST_DEVICE inline double box_iou(const T* a, const T* b) {
  const double ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
  const double bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
  const double iw = fmin(ax2, bx2) - fmax(ax1, bx1), ih = fmin(ay2, by2) - fmax(ay1, by1);
  const double inter = iw > 0.0 && ih > 0.0 ? mul_rn(iw, ih) : 0.0;
  const double area_a = mul_rn(fmax(ax2 - ax1, 0.0), fmax(ay2 - ay1, 0.0));
  const double area_b = mul_rn(fmax(bx2 - bx1, 0.0), fmax(by2 - by1, 0.0));
  return iou_of(inter, area_a, area_b);
}

}  // namespace fastseg::common
