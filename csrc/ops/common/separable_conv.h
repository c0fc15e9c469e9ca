#pragma once
// Index math of the (dilated, strided) depthwise stage, shared by CPU and CUDA kernels.
#include <cstdint>

#include "ops/common/macros.h"

namespace fastseg::common {

// Output length of a k-tap convolution with dilation d and stride s over n padded inputs.
FASTSEG_HOST_DEVICE inline int64_t conv_out_size(int64_t n, int64_t pad_beg, int64_t pad_end,
                                                 int64_t k, int64_t d, int64_t s) {
  const int64_t k_eff = (k - 1) * d + 1;
  const int64_t span = n + pad_beg + pad_end - k_eff;
  return span < 0 ? 0 : span / s + 1;
}

// Input coordinate read by output o at tap t.
FASTSEG_HOST_DEVICE inline int64_t tap_input(int64_t o, int64_t t, int64_t s, int64_t d,
                                             int64_t pad_beg) {
  return o * s - pad_beg + t * d;
}

// Half-open range [lo, hi) of outputs o in [0, n_out) whose tap t lands inside [0, n_in).
// Lets the CPU kernels run branch-free inner loops.
FASTSEG_HOST_DEVICE inline void tap_valid_range(int64_t n_in, int64_t n_out, int64_t t, int64_t s,
                                                int64_t d, int64_t pad_beg, int64_t* lo,
                                                int64_t* hi) {
  const int64_t off = t * d - pad_beg;  // input = o*s + off
  // smallest o with o*s + off >= 0
  int64_t a = off >= 0 ? 0 : (-off + s - 1) / s;
  // largest o with o*s + off <= n_in - 1, plus one
  const int64_t last = n_in - 1 - off;
  int64_t b = last < 0 ? 0 : last / s + 1;
  a = a < n_out ? a : n_out;
  b = b < n_out ? b : n_out;
  *lo = a;
  *hi = b > a ? b : a;
}

// Output o that input i feeds through tap t, or -1 when none (stride skips it or out of range).
FASTSEG_HOST_DEVICE inline int64_t tap_output(int64_t i, int64_t t, int64_t s, int64_t d,
                                              int64_t pad_beg, int64_t n_out) {
  const int64_t num = i + pad_beg - t * d;
  if (num < 0 || num % s != 0) return -1;
  const int64_t o = num / s;
  return o < n_out ? o : -1;
}

// Folded-BatchNorm affine (scale 1 / shift 0 when absent) followed by an optional ReLU.
template <typename acc_t>
FASTSEG_HOST_DEVICE inline acc_t affine_act(acc_t v, acc_t scale, acc_t shift, bool relu) {
  v = v * scale + shift;
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

}  // namespace fastseg::common
