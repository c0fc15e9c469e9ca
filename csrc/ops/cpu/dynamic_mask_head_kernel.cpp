// CPU kernel of fastseg::dynamic_mask_head (SOLOv2's dynamic mask prediction, inference only).
//
// The n x H*W logits are computed as tiles of kTileN candidates x kTileP pixels (a BLAS GEMM of the
// tile into a buffer that stays in cache; low-precision inputs are widened to float32 first), and each
// tile is consumed at once: threshold on the logit, bit-pack (64 pixels a word), popcount, and the sum
// of sigmoid over the mask's pixels. Only the words and per-tile partial sums are written; the partial
// sums are reduced in a fixed order afterwards (the result does not depend on the thread count).
// Tasks run pixel-tile major, so consecutive tasks of a thread reuse the same [E, kTileP] features.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops/common/dynamic_mask_head.h"
#include "ops/dynamic_mask_head.h"

namespace fastseg::ops {
namespace {

constexpr int64_t kTileWords = 8;
constexpr int64_t kTileP = 64 * kTileWords;  // pixels per tile
constexpr int64_t kTileN = 128;              // candidates per tile (float tile: 256 KiB)
constexpr int kLanes = 16;                   // partial sums of the sigmoid loop

// sigmoid(x) for the maskness sums. float: Cephes' expf polynomial (~1 ulp), rounding by the 1.5 * 2^23
// trick and the exponent set through the bits: branch-free, so the loop over a row vectorises.
inline float sigmoid_acc(float x) {
  const float z = std::min(std::max(-x, -87.0f), 87.0f);  // exp(-x), clamped: sigmoid saturates
  const float n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(z / ln 2)
  const float r = z - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &e, sizeof bits);
  bits += static_cast<int32_t>(n) << 23;  // e * 2^n
  float ez;
  std::memcpy(&ez, &bits, sizeof ez);
  return 1.0f / (1.0f + ez);
}
inline double sigmoid_acc(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <typename acc_t>
struct TileOut {
  uint64_t* words;  // [len_words] of the row's mask
  int64_t* count;   // the row's pixel count in this tile
  acc_t* sum;       // the row's sum of sigmoid over the mask in this tile
};

// One row of a tile: len pixels of logits c, threshold t.
template <typename acc_t>
[[gnu::always_inline]] inline void row_epilogue_impl(const acc_t* __restrict__ c, int64_t len,
                                                     acc_t t, const TileOut<acc_t>& out) {
  int64_t count = 0;
  const int64_t full = len / 64;
  for (int64_t w = 0; w < full; ++w) {
    const acc_t* x = c + w * 64;
    uint64_t word = 0;
    for (int i = 0; i < 64; ++i) word |= static_cast<uint64_t>(x[i] > t) << i;
    out.words[w] = word;
    count += __builtin_popcountll(word);
  }
  if (full * 64 < len) {
    uint64_t word = 0;
    for (int64_t i = full * 64; i < len; ++i) word |= static_cast<uint64_t>(c[i] > t) << (i - full * 64);
    out.words[full] = word;
    count += __builtin_popcountll(word);
  }
  *out.count = count;
  if (count == 0) {
    *out.sum = 0;
    return;
  }
  // Every pixel's sigmoid, kept where in the mask: no branch in the vectorised loop.
  acc_t part[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= len; p += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t x = c[p + j];
      part[j] += sigmoid_acc(x) * static_cast<acc_t>(x > t);
    }
  for (; p < len; ++p) part[0] += c[p] > t ? sigmoid_acc(c[p]) : acc_t(0);
  acc_t s = 0;
  for (int j = 0; j < kLanes; ++j) s += part[j];
  *out.sum = s;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTSEG_DMH_AVX512 1
// GCC 12's AVX-512 headers self-initialise their "undefined" vectors (__Y = __Y) and warn about it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// float rows on AVX-512: the comparison yields 16 mask bits at once (vcmpps into a k register), and
// the sigmoid (the same polynomial, exponent by vscalefps) runs only on 16-pixel groups with a pixel
// in the mask: most groups of a small object's mask are empty.
#define FASTSEG_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
FASTSEG_AVX512 inline __m512 sigmoid16(__m512 x) {
  const __m512 z = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), x),
                                               _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), z);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, one));
  return _mm512_div_ps(one, _mm512_add_ps(one, _mm512_scalef_ps(e, n)));
}

FASTSEG_AVX512 void row_epilogue_avx512(const float* c, int64_t len, float t,
                                        const TileOut<float>& out) {
  const __m512 tv = _mm512_set1_ps(t);
  __m512 acc = _mm512_setzero_ps();
  int64_t count = 0;
  for (int64_t w = 0; w * 64 < len; ++w) {
    uint64_t word = 0;
    for (int k = 0; k < 4; ++k) {
      const int64_t p0 = w * 64 + k * 16;
      if (p0 >= len) break;
      const int64_t rem = len - p0;
      const __mmask16 valid = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(valid, c + p0);
      const __mmask16 m = _mm512_mask_cmp_ps_mask(valid, x, tv, _CMP_GT_OQ);
      word |= static_cast<uint64_t>(m) << (16 * k);
      if (m != 0) acc = _mm512_mask_add_ps(acc, m, acc, sigmoid16(x));
    }
    out.words[w] = word;
    count += __builtin_popcountll(word);
  }
  *out.count = count;
  *out.sum = _mm512_reduce_add_ps(acc);
}
#pragma GCC diagnostic pop
#endif

// Compiled for AVX2 / AVX-512 too (target_clones does not take templates).
FASTSEG_CPU_CLONES void row_epilogue_generic(const float* c, int64_t len, float t,
                                             const TileOut<float>& out) {
  row_epilogue_impl(c, len, t, out);
}

void row_epilogue(const float* c, int64_t len, float t, const TileOut<float>& out) {
#ifdef FASTSEG_DMH_AVX512
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  if (avx512) return row_epilogue_avx512(c, len, t, out);
#endif
  row_epilogue_generic(c, len, t, out);
}
void row_epilogue(const double* c, int64_t len, double t, const TileOut<double>& out) {
  row_epilogue_impl(c, len, t, out);
}

// The acc_t (float or double) tiles of kernels . features and their epilogue; maskness in acc_t.
template <typename acc_t>
void dynamic_mask_head_impl(const at::Tensor& kernels, const at::Tensor& features, double mask_thr,
                            at::Tensor& masks, at::Tensor& areas, at::Tensor& maskness) {
  const int64_t n = kernels.size(0), e = kernels.size(1), hw = features.size(1);
  const int64_t words = masks.size(1);
  const double lt = common::mask_logit_threshold(mask_thr);
  acc_t t;
  if constexpr (std::is_same_v<acc_t, double>) t = lt; else t = common::mask_logit_threshold_f(lt);
  const int64_t ptiles = (hw + kTileP - 1) / kTileP, ntiles = (n + kTileN - 1) / kTileN;
  std::vector<int64_t> counts(n * ptiles);
  std::vector<acc_t> sums(n * ptiles);
  uint64_t* mp = reinterpret_cast<uint64_t*>(masks.mutable_data_ptr<int64_t>());
  at::parallel_for(0, ptiles * ntiles, 1, [&](int64_t t0, int64_t t1) {
    auto c = at::empty({kTileN * kTileP}, kernels.options());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t pt = task / ntiles, r0 = (task % ntiles) * kTileN;
      const int64_t p0 = pt * kTileP, len = std::min(kTileP, hw - p0);
      const int64_t rows = std::min(kTileN, n - r0);
      // The [rows, len] tile (row-major, ld len): a BLAS GEMM with the features' row stride.
      auto tile = c.narrow(0, 0, rows * len).view({rows, len});
      if (e == 0) tile.zero_(); else at::mm_out(tile, kernels.narrow(0, r0, rows), features.narrow(1, p0, len));
      const acc_t* cp = tile.const_data_ptr<acc_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r;
        row_epilogue(cp + r * len, len, t,
                     TileOut<acc_t>{mp + row * words + pt * kTileWords, &counts[row * ptiles + pt],
                                    &sums[row * ptiles + pt]});
      }
    }
  });
  float* ap = areas.mutable_data_ptr<float>();
  acc_t* mk = maskness.mutable_data_ptr<acc_t>();
  for (int64_t r = 0; r < n; ++r) {
    int64_t count = 0;
    double s = 0.0;
    for (int64_t pt = 0; pt < ptiles; ++pt) {
      count += counts[r * ptiles + pt];
      s += static_cast<double>(sums[r * ptiles + pt]);
    }
    ap[r] = static_cast<float>(count);
    mk[r] = count > 0 ? static_cast<acc_t>(s / static_cast<double>(count)) : acc_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_mask_head_cpu(const at::Tensor& kernels,
                                                                     const at::Tensor& features,
                                                                     double mask_thr) {
  dynamic_mask_head_check(kernels, features, mask_thr);
  TORCH_CHECK(kernels.device().is_cpu(), "kernels must be a CPU tensor for the cpu kernel, got ",
              kernels.device());
  const int64_t n = kernels.size(0), e = kernels.size(1);
  const int64_t hw = features.size(1) * features.size(2);
  auto masks = at::empty({n, common::mask_words(hw)}, kernels.options().dtype(at::kLong));
  auto areas = at::zeros({n}, kernels.options().dtype(at::kFloat));
  if (n == 0 || hw == 0) return {masks, areas, at::zeros({n}, kernels.options())};
  // Low-precision inputs are widened once (exact): the GEMM tiles accumulate in float32.
  const auto acc = kernels.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto k = kernels.to(acc).contiguous();
  const auto f = features.reshape({e, hw}).to(acc).contiguous();
  auto maskness = at::empty({n}, kernels.options().dtype(acc));
  if (acc == at::kDouble) {
    dynamic_mask_head_impl<double>(k, f, mask_thr, masks, areas, maskness);
  } else {
    dynamic_mask_head_impl<float>(k, f, mask_thr, masks, areas, maskness);
  }
  return {masks, areas, maskness.to(kernels.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) { m.impl("dynamic_mask_head", &dynamic_mask_head_cpu); }

}  // namespace fastseg::ops
