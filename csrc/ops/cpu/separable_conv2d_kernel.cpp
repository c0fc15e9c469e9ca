// CPU kernels of fastseg::separable_conv2d.
//
// Forward, two paths chosen per shape (use_split_forward):
//  * fused: one pass per tile of output rows of one image. The depthwise result of the tile
//    ([C, tile] values, sized to stay in cache) is built with branch-free row loops, gets its
//    affine + ReLU, and feeds a BLAS GEMM that writes the pointwise result straight into the
//    output, whose affine + ReLU epilogue runs while the tile is still in cache. The
//    [N, C, Ho, Wo] depthwise intermediate is never materialised.
//  * split: the same depthwise loops write the intermediate (affine + ReLU applied) once, and the
//    pointwise stage runs as eager's 1x1 convolution (oneDNN, faster than BLAS where C·O is large)
//    with the pointwise scale folded into the weight and the shift as its bias.
// Backward: the shared composite with the depthwise kernels below, the depthwise affine + ReLU's
// backward in one pass, and the pointwise gradients through eager's 1x1 convolution backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/ConvUtils.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string_view>
#include <vector>

#include "ops/common/separable_conv.h"
#include "ops/separable_conv2d.h"


namespace fastseg::ops {
namespace {

using common::affine_act;
using common::tap_input;
using common::tap_valid_range;

// Whether the split forward (use_split_forward) beats the fused one for C -> O channels, where
// eager's 1x1 convolution runs oneDNN. Split saves the GEMM-rate gap, ~C·O FLOPs per pixel, and
// pays ~3C + 2O extra memory traffic per pixel (the intermediate written and read, oneDNN's
// reorders, the final ReLU): split where C·O / (3C + 2O) >= 40. Measured here (AMD EPYC, 2
// threads, load ~2, single samples), eager's oneDNN 1x1 conv vs the BLAS GEMM: 128 -> 128 at
// 129x129 (ratio 26) 21.0 vs 15.2 ms, BLAS ahead; 256 -> 256 at 129x129 (51) 31.7 vs 55.9 ms;
// 2048 -> 256 at 33x33 (79) 19.4 vs 24.0 ms; 1536 -> 2048 at 33x33 (361) 41.5 vs 43.6 ms.
// Under heavy load (load 17 on 2 cores) the fused kernel won everywhere: oneDNN's threads
// suffer most from oversubscription; the rule follows the quiet machine.
bool split_pays(int64_t C, int64_t O) { return C * O >= 40 * (3 * C + 2 * O); }

// Geometry of one channel plane plus, per column tap j, the output columns [lo, hi) whose
// input column ow * s + off stays inside the image: computed once, so inner loops are branch-free.
struct Plane {
  int64_t H, W, Ho, Wo, k, s, d, pb;
  std::vector<int64_t> lo, hi, off;
};

Plane plane_of(int64_t H, int64_t W, int64_t k, const SepConvGeometry& g) {
  Plane pl{H, W,
           common::conv_out_size(H, g.pad_beg, g.pad_end, k, g.dilation, g.stride),
           common::conv_out_size(W, g.pad_beg, g.pad_end, k, g.dilation, g.stride),
           k, g.stride, g.dilation, g.pad_beg, std::vector<int64_t>(k), std::vector<int64_t>(k),
           std::vector<int64_t>(k)};
  for (int64_t j = 0; j < k; ++j) {
    tap_valid_range(W, pl.Wo, j, pl.s, pl.d, pl.pb, &pl.lo[j], &pl.hi[j]);
    pl.off[j] = j * pl.d - pl.pb;
  }
  return pl;
}

// Depthwise of one channel plane `xp` [H, W] with taps `wc` [k, k] for output rows [oh0, oh1);
// writes out[(oh - oh0) * Wo + ow].
template <typename T>
FASTSEG_CPU_CLONES void depthwise_rows(const T* __restrict__ xp, const T* __restrict__ wc,
                                       T* __restrict__ out, int64_t oh0, int64_t oh1,
                                       const Plane& pl) {
  const int64_t H = pl.H, W = pl.W, Wo = pl.Wo, k = pl.k, s = pl.s, d = pl.d, pb = pl.pb;
  const int64_t *lo = pl.lo.data(), *hi = pl.hi.data(), *off = pl.off.data();
  std::fill(out, out + (oh1 - oh0) * Wo, T(0));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    T* orow = out + (oh - oh0) * Wo;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t ih = tap_input(oh, i, s, d, pb);
      if (ih < 0 || ih >= H) continue;
      for (int64_t j = 0; j < k; ++j) {
        const T wv = wc[i * k + j];
        const T* xs = xp + ih * W + off[j];
        if (s == 1) {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) orow[ow] += wv * xs[ow];
        } else {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) orow[ow] += wv * xs[ow * s];
        }
      }
    }
  }
}

template <typename T>
FASTSEG_CPU_CLONES void act_row(T* v, int64_t n, const T* scale, const T* shift, int64_t c, bool relu) {
  const T sc = scale ? scale[c] : T(1), sh = shift ? shift[c] : T(0);
  for (int64_t p = 0; p < n; ++p) v[p] = affine_act(v[p], sc, sh, relu);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Output rows per tile: the [C, rows * Wo] depthwise block stays within ~8 MiB (L3), and the
// tiles of all images split evenly over the threads. BLAS re-packs the pointwise weight on every
// call, so few large GEMMs beat many L2-sized ones (measured: 2.2x faster than 1 MiB tiles at
// C = 2048, 33 x 33).
int64_t tile_rows(int64_t N, int64_t C, int64_t Ho, int64_t Wo, size_t elem) {
  const int64_t budget = (8 << 20) / static_cast<int64_t>(C * Wo * elem);
  int64_t tiles = (Ho + std::max<int64_t>(budget, 1) - 1) / std::max<int64_t>(budget, 1);
  const int64_t threads = at::get_num_threads();
  if (N * tiles % threads != 0 && N * tiles < 8 * threads) {
    tiles = ((N * tiles + threads - 1) / threads * threads + N - 1) / N;
  }
  tiles = std::min(tiles, Ho);
  return (Ho + tiles - 1) / tiles;
}

template <typename T>
void fused_forward(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw,
                   const at::Tensor& ds, const at::Tensor& dh, const at::Tensor& ps,
                   const at::Tensor& ph, at::Tensor& out, const SepConvGeometry& g,
                   bool dw_relu, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), O = pw.size(0);
  const Plane pl = plane_of(x.size(2), x.size(3), dw.size(2), g);
  const int64_t P = pl.Ho * pl.Wo, HW = pl.H * pl.W, kk = pl.k * pl.k;
  const int64_t rows = tile_rows(N, C, pl.Ho, pl.Wo, sizeof(T)), tile = rows * pl.Wo;
  const int64_t tiles_per_image = (pl.Ho + rows - 1) / rows;
  const T *xp = x.const_data_ptr<T>(), *wp = dw.const_data_ptr<T>();
  const auto pw2 = pw.view({O, C});
  const T *dsp = ptr_or_null<T>(ds), *dhp = ptr_or_null<T>(dh);
  const T *psp = ptr_or_null<T>(ps), *php = ptr_or_null<T>(ph);
  T* op = out.mutable_data_ptr<T>();

  at::parallel_for(0, N * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
    auto ybuf = at::empty({C, tile}, x.options());  // per-thread scratch, seen by the profiler
    T* yp = ybuf.mutable_data_ptr<T>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_image;
      const int64_t oh0 = (t % tiles_per_image) * rows, oh1 = std::min(oh0 + rows, pl.Ho);
      const int64_t p0 = oh0 * pl.Wo, np = (oh1 - oh0) * pl.Wo;
      for (int64_t c = 0; c < C; ++c) {
        T* yc = yp + c * tile;
        depthwise_rows(xp + (n * C + c) * HW, wp + c * kk, yc, oh0, oh1, pl);
        act_row(yc, np, dsp, dhp, c, dw_relu);
      }
      // out[n, :, p0:p0+np] = pw[O, C] @ y[C, np]: BLAS writes the strided output view in place.
      T* otile = op + n * O * P + p0;
      auto y_t = at::from_blob(yp, {C, np}, {tile, 1}, x.options());
      auto o_t = at::from_blob(otile, {O, np}, {P, 1}, x.options());
      at::mm_out(o_t, pw2, y_t);
      for (int64_t o = 0; o < O; ++o) act_row(otile + o * P, np, psp, php, o, relu);
    }
  });
}

// ---- depthwise primitives for the backward ---------------------------------------------------

// The depthwise stage over whole planes -> [N, C, Ho, Wo], with the per-channel affine (scale /
// shift: undefined or [C] of x's dtype) and ReLU applied while each plane is in cache.
at::Tensor depthwise_act(const at::Tensor& x, const at::Tensor& w, const SepConvGeometry& g,
                         const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const Plane pl = plane_of(x.size(2), x.size(3), w.size(2), g);
  auto out = at::empty({x.size(0), x.size(1), pl.Ho, pl.Wo}, x.options());
  if (out.numel() == 0) return out;
  const int64_t C = x.size(1), P = pl.Ho * pl.Wo, kk = pl.k * pl.k;
  const bool act = scale.defined() || shift.defined() || relu;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_forward_cpu", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    const scalar_t *sp = ptr_or_null<scalar_t>(scale), *hp = ptr_or_null<scalar_t>(shift);
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        depthwise_rows(xp + nc * pl.H * pl.W, wp + (nc % C) * kk, op + nc * P, 0, pl.Ho, pl);
        if (act) act_row(op + nc * P, P, sp, hp, nc % C, relu);
      }
    });
  });
  return out;
}

at::Tensor depthwise_forward(const at::Tensor& x, const at::Tensor& w, const SepConvGeometry& g) {
  return depthwise_act(x, w, g, at::Tensor(), at::Tensor(), false);
}

// Transpose of depthwise_rows for one plane: scatters grad [Ho, Wo] into gx [H, W] (zeroed).
template <typename T>
FASTSEG_CPU_CLONES void depthwise_plane_backward_input(const T* __restrict__ grad,
                                                       const T* __restrict__ wc,
                                                       T* __restrict__ gx, const Plane& pl) {
  const int64_t H = pl.H, W = pl.W, Wo = pl.Wo, k = pl.k, s = pl.s, d = pl.d, pb = pl.pb;
  const int64_t *lo = pl.lo.data(), *hi = pl.hi.data(), *off = pl.off.data();
  for (int64_t oh = 0; oh < pl.Ho; ++oh) {
    const T* grow = grad + oh * Wo;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t ih = tap_input(oh, i, s, d, pb);
      if (ih < 0 || ih >= H) continue;
      for (int64_t j = 0; j < k; ++j) {
        const T wv = wc[i * k + j];
        T* xs = gx + ih * W + off[j];
        if (s == 1) {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) xs[ow] += wv * grow[ow];
        } else {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) xs[ow * s] += wv * grow[ow];
        }
      }
    }
  }
}

// Weight gradient of one plane: acc[i * k + j] += sum over outputs of grad * tapped input.
// Rows are summed in T, then accumulated in double (sums over N * Ho * Wo can be long).
template <typename T>
FASTSEG_CPU_CLONES void depthwise_plane_backward_weight(const T* __restrict__ grad,
                                                        const T* __restrict__ x, double* acc,
                                                        const Plane& pl) {
  const int64_t H = pl.H, W = pl.W, Wo = pl.Wo, k = pl.k, s = pl.s, d = pl.d, pb = pl.pb;
  const int64_t *lo = pl.lo.data(), *hi = pl.hi.data(), *off = pl.off.data();
  for (int64_t oh = 0; oh < pl.Ho; ++oh) {
    const T* grow = grad + oh * Wo;
    for (int64_t i = 0; i < k; ++i) {
      const int64_t ih = tap_input(oh, i, s, d, pb);
      if (ih < 0 || ih >= H) continue;
      for (int64_t j = 0; j < k; ++j) {
        const T* xs = x + ih * W + off[j];
        T row = 0;
        if (s == 1) {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) row += grow[ow] * xs[ow];
        } else {
          for (int64_t ow = lo[j]; ow < hi[j]; ++ow) row += grow[ow] * xs[ow * s];
        }
        acc[i * k + j] += row;
      }
    }
  }
}

at::Tensor depthwise_backward_input(const at::Tensor& grad, const at::Tensor& w, int64_t H,
                                    int64_t W, const SepConvGeometry& g) {
  const int64_t N = grad.size(0), C = grad.size(1);
  const Plane pl = plane_of(H, W, w.size(2), g);
  const int64_t kk = pl.k * pl.k, P = pl.Ho * pl.Wo;
  auto gx = at::zeros({N, C, H, W}, grad.options());
  if (gx.numel() == 0 || grad.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "depthwise_backward_input_cpu", [&] {
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    scalar_t* xp = gx.mutable_data_ptr<scalar_t>();
    // One plane per task: the scatter never crosses planes, so it needs no atomics.
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc)
        depthwise_plane_backward_input(gp + nc * P, wp + (nc % C) * kk, xp + nc * H * W, pl);
    });
  });
  return gx;
}

at::Tensor depthwise_backward_weight(const at::Tensor& grad, const at::Tensor& x, int64_t k,
                                     const SepConvGeometry& g) {
  const int64_t N = x.size(0), C = x.size(1);
  const Plane pl = plane_of(x.size(2), x.size(3), k, g);
  const int64_t HW = pl.H * pl.W, P = pl.Ho * pl.Wo;
  auto gw = at::zeros({C, 1, k, k}, x.options());
  if (grad.numel() == 0) return gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward_weight_cpu", [&] {
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* wp = gw.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      std::vector<double> acc(k * k);
      for (int64_t c = b; c < e; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t n = 0; n < N; ++n)
          depthwise_plane_backward_weight(gp + (n * C + c) * P, xp + (n * C + c) * HW, acc.data(), pl);
        for (int64_t t = 0; t < k * k; ++t) wp[c * k * k + t] = static_cast<scalar_t>(acc[t]);
      }
    });
  });
  return gw;
}

// The depthwise affine + ReLU's backward in one pass over the planes (the composite takes five):
// gb = gy where y > 0 (or everywhere without ReLU), ga = gb * scale, and the scale / shift
// gradients Σ gb * a, Σ gb, summed per plane in T and across planes in double.
template <typename T>
FASTSEG_CPU_CLONES void act_backward_plane(const T* __restrict__ gy, const T* __restrict__ y,
                                           const T* __restrict__ a, T* __restrict__ ga,
                                           int64_t P, T scale, bool relu, T* sa, T* sg) {
  T s_a = 0, s_g = 0;
#pragma omp simd reduction(+ : s_a, s_g)
  for (int64_t p = 0; p < P; ++p) {
    const T gb = (!relu || y[p] > T(0)) ? gy[p] : T(0);
    s_a += gb * a[p];
    s_g += gb;
    ga[p] = gb * scale;
  }
  *sa = s_a;
  *sg = s_g;
}

DepthwiseActGrads depthwise_act_backward_cpu(const at::Tensor& gy, const at::Tensor& y,
                                             const at::Tensor& a, const at::Tensor& scale,
                                             const at::Tensor& shift, bool relu) {
  const int64_t N = gy.size(0), C = gy.size(1), P = gy.size(2) * gy.size(3);
  auto ga = at::empty_like(gy);
  auto g_scale = at::empty({C}, gy.options()), g_shift = at::empty({C}, gy.options());
  AT_DISPATCH_FLOATING_TYPES(gy.scalar_type(), "depthwise_act_backward_cpu", [&] {
    const scalar_t *gp = gy.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t *ap = a.const_data_ptr<scalar_t>(), *sp = ptr_or_null<scalar_t>(scale);
    scalar_t *gap = ga.mutable_data_ptr<scalar_t>(), *gsp = g_scale.mutable_data_ptr<scalar_t>();
    scalar_t* ghp = g_shift.mutable_data_ptr<scalar_t>();
    // One channel per task over all images: fixed summation order, no atomics.
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        double acc_a = 0, acc_g = 0;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t off = (n * C + c) * P;
          scalar_t s_a, s_g;
          act_backward_plane(gp + off, yp + off, ap + off, gap + off, P,
                             sp ? sp[c] : scalar_t(1), relu, &s_a, &s_g);
          acc_a += s_a;
          acc_g += s_g;
        }
        gsp[c] = static_cast<scalar_t>(acc_a);
        ghp[c] = static_cast<scalar_t>(acc_g);
      }
    });
  });
  return {ga, scale.defined() ? g_scale : at::Tensor(), shift.defined() ? g_shift : at::Tensor()};
}

// ---- the pointwise stage as a 1x1 convolution (oneDNN) -------------------------------------------

// FASTSEG_SEPCONV_CPU_PATH=fused|split forces the path below (tests, benchmarks); unset: auto.
enum class Path { kAuto, kFused, kSplit };

Path forced_path() {
  const char* v = std::getenv("FASTSEG_SEPCONV_CPU_PATH");
  if (v == nullptr) return Path::kAuto;
  const std::string_view s(v);
  return s == "fused" ? Path::kFused : s == "split" ? Path::kSplit : Path::kAuto;
}

// Whether eager PyTorch runs the 1x1 convolution of y [N, C, Ho, Wo] by w [O, C, 1, 1] through
// oneDNN (float32, oneDNN enabled, and, for 1x1 kernels, more than one thread or N >= 16). Asked
// with zero-stride stand-ins, so nothing of y's size is allocated.
bool eager_pointwise_on_onednn(int64_t N, int64_t C, int64_t O, int64_t P, at::ScalarType st) {
  if (st != at::kFloat) return false;
  const auto opts = at::TensorOptions().dtype(st);
  const auto y = at::empty({1}, opts).expand({N, C, P, 1});
  const auto w = at::empty({1}, opts).expand({O, C, 1, 1});
  const std::array<c10::SymInt, 2> one{1, 1}, zero{0, 0};
  return at::native::select_conv_backend(y, w, std::nullopt, one, zero, one, false, zero, 1,
                                         std::nullopt) == at::native::ConvBackend::Mkldnn;
}

// Whether the pointwise stage runs as a 1x1 convolution (at::convolution and its backward, as
// eager runs it): by default where that is oneDNN; always when forced to the split path.
bool pointwise_as_conv(int64_t N, int64_t C, int64_t O, int64_t P, at::ScalarType st) {
  if (N * P == 0 || C == 0 || O == 0) return false;
  const Path path = forced_path();
  return path == Path::kSplit || (path == Path::kAuto && eager_pointwise_on_onednn(N, C, O, P, st));
}

// The pointwise gradients through eager's 1x1 convolution backward (oneDNN) where
// pointwise_as_conv says so, else through BLAS (pointwise_backward_matmul).
PointwiseGrads pointwise_backward_cpu(const at::Tensor& g, const at::Tensor& y,
                                      const at::Tensor& w) {
  if (!pointwise_as_conv(y.size(0), y.size(1), w.size(0), y.size(2) * y.size(3), y.scalar_type())) {
    return pointwise_backward_matmul(g, y, w);
  }
  auto [gy, gw, gb] = at::convolution_backward(g, y, w, std::nullopt, {1, 1}, {0, 0}, {1, 1},
                                               false, {0, 0}, 1, {true, true, false});
  return {gy.contiguous(), gw.contiguous()};
}

constexpr DepthwiseKernels kCpuDepthwise{depthwise_forward, depthwise_backward_input,
                                         depthwise_backward_weight, pointwise_backward_cpu,
                                         depthwise_act_backward_cpu};

// Which forward runs: the fused tile kernel (the depthwise tile feeds a BLAS GEMM in cache; the
// [N, C, Ho, Wo] intermediate is never written) or the split one (the depthwise stage with its
// affine + ReLU writes the intermediate once, and the pointwise stage runs as eager's 1x1
// convolution, oneDNN), by split_pays.
bool use_split_forward(int64_t N, int64_t C, int64_t O, int64_t P, at::ScalarType st) {
  if (!pointwise_as_conv(N, C, O, P, st)) return false;
  return forced_path() == Path::kSplit || split_pays(C, O);
}

at::Tensor split_forward(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw,
                         const at::Tensor& ds, const at::Tensor& dh, const at::Tensor& ps,
                         const at::Tensor& ph, const SepConvGeometry& g, bool dw_relu,
                         bool relu) {
  const auto y = depthwise_act(x, dw, g, ds, dh, dw_relu);
  const auto w = ps.defined() ? pw * ps.view({-1, 1, 1, 1}) : pw;
  auto out = at::convolution(y, w, ph.defined() ? std::optional<at::Tensor>(ph) : std::nullopt,
                             {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1);
  if (relu) out.relu_();
  return out.contiguous();
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the cpu kernel, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the cpu backend of separable_conv2d supports float32 and float64 x, got ",
              x.scalar_type());
}

at::Tensor separable_conv2d_cpu(const at::Tensor& x, const at::Tensor& dw_weight,
                                const at::Tensor& pw_weight,
                                const std::optional<at::Tensor>& dw_scale,
                                const std::optional<at::Tensor>& dw_shift,
                                const std::optional<at::Tensor>& pw_scale,
                                const std::optional<at::Tensor>& pw_shift, int64_t stride,
                                int64_t pad_beg, int64_t pad_end, int64_t dilation, bool dw_relu,
                                bool relu) {
  const SepConvGeometry g{stride, pad_beg, pad_end, dilation};
  const auto shape =
      separable_conv2d_check(x, dw_weight, pw_weight, dw_scale, dw_shift, pw_scale, pw_shift, g);
  check_cpu(x);
  // Below autograd: the at:: calls inside must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  if (c10::multiply_integers(shape) == 0) return at::empty(shape, x.options());
  const auto st = x.scalar_type();
  const auto xc = x.contiguous(), dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const auto ds = affine_param(dw_scale, st), dh = affine_param(dw_shift, st);
  const auto ps = affine_param(pw_scale, st), ph = affine_param(pw_shift, st);
  if (use_split_forward(shape[0], x.size(1), shape[1], shape[2] * shape[3], st)) {
    return split_forward(xc, dwc, pwc, ds, dh, ps, ph, g, dw_relu, relu);
  }
  auto out = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES(st, "separable_conv2d_cpu", [&] {
    fused_forward<scalar_t>(xc, dwc, pwc, ds, dh, ps, ph, out, g, dw_relu, relu);
  });
  return out;
}

SepConvGrads separable_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& dw_weight,
    const at::Tensor& pw_weight, const std::optional<at::Tensor>& dw_scale,
    const std::optional<at::Tensor>& dw_shift, const std::optional<at::Tensor>& pw_scale,
    const std::optional<at::Tensor>& pw_shift, int64_t stride, int64_t pad_beg, int64_t pad_end,
    int64_t dilation, bool dw_relu, bool relu) {
  check_cpu(x);
  return separable_conv2d_backward_impl(grad_out, x, dw_weight, pw_weight, dw_scale, dw_shift,
                                        pw_scale, pw_shift, {stride, pad_beg, pad_end, dilation},
                                        dw_relu, relu, kCpuDepthwise);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("separable_conv2d", &separable_conv2d_cpu);
  m.impl("_separable_conv2d_backward", &separable_conv2d_backward_cpu);
}

}  // namespace fastseg::ops
