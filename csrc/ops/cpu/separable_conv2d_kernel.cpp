// CPU kernels of fastseg::separable_conv2d.
//
// Forward: one pass per tile of output pixels of one image. The depthwise result of the tile
// ([C, tile] floats, sized to stay in L2) is built with branch-free row loops, gets its affine +
// ReLU, and feeds a BLAS GEMM that writes the pointwise result straight into the output, whose
// affine + ReLU epilogue runs while the tile is still in cache. The [N, C, Ho, Wo] depthwise
// intermediate is never materialised. Backward: depthwise kernels below + the shared composite.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/common/separable_conv.h"
#include "ops/separable_conv2d.h"

namespace fastseg::ops {
namespace {

using common::affine_act;
using common::tap_input;
using common::tap_valid_range;

struct Plane {
  int64_t H, W, Ho, Wo, k;
};

Plane plane_of(const at::Tensor& x, int64_t k, const SepConvGeometry& g) {
  const int64_t H = x.size(2), W = x.size(3);
  return {H, W, common::conv_out_size(H, g.pad_beg, g.pad_end, k, g.dilation, g.stride),
          common::conv_out_size(W, g.pad_beg, g.pad_end, k, g.dilation, g.stride), k};
}

// Depthwise of one channel plane `xp` [H, W] with taps `wc` [k, k] for the flattened output
// pixels [p0, p1); writes out[0, p1 - p0).
template <typename T>
void depthwise_span(const T* xp, const T* wc, T* out, int64_t p0, int64_t p1, const Plane& pl,
                    const SepConvGeometry& g) {
  const int64_t s = g.stride, d = g.dilation, pb = g.pad_beg;
  std::fill(out, out + (p1 - p0), T(0));
  for (int64_t oh = p0 / pl.Wo; oh * pl.Wo < p1; ++oh) {
    const int64_t ow_a = std::max<int64_t>(p0 - oh * pl.Wo, 0);
    const int64_t ow_b = std::min<int64_t>(p1 - oh * pl.Wo, pl.Wo);
    T* orow = out + (oh * pl.Wo - p0);  // indexed by ow
    for (int64_t i = 0; i < pl.k; ++i) {
      const int64_t ih = tap_input(oh, i, s, d, pb);
      if (ih < 0 || ih >= pl.H) continue;
      const T* xrow = xp + ih * pl.W;
      for (int64_t j = 0; j < pl.k; ++j) {
        int64_t lo, hi;
        tap_valid_range(pl.W, pl.Wo, j, s, d, pb, &lo, &hi);
        lo = std::max(lo, ow_a);
        hi = std::min(hi, ow_b);
        const T wv = wc[i * pl.k + j];
        const T* xs = xrow + (j * d - pb);
        if (s == 1) {
          for (int64_t ow = lo; ow < hi; ++ow) orow[ow] += wv * xs[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) orow[ow] += wv * xs[ow * s];
        }
      }
    }
  }
}

template <typename T>
void act_row(T* v, int64_t n, const T* scale, const T* shift, int64_t c, bool relu) {
  const T sc = scale ? scale[c] : T(1), sh = shift ? shift[c] : T(0);
  for (int64_t p = 0; p < n; ++p) v[p] = affine_act(v[p], sc, sh, relu);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Pixels per tile: the [C, tile] depthwise block stays within ~256 KiB of L2.
int64_t tile_pixels(int64_t C, int64_t P, size_t elem) {
  int64_t t = (256 * 1024) / static_cast<int64_t>(C * elem);
  t = std::clamp<int64_t>(t / 16 * 16, 16, 512);
  return std::min<int64_t>(t, std::max<int64_t>(P, 1));
}

template <typename T>
void fused_forward(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw,
                   const at::Tensor& ds, const at::Tensor& dh, const at::Tensor& ps,
                   const at::Tensor& ph, at::Tensor& out, const SepConvGeometry& g,
                   bool dw_relu, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), O = pw.size(0);
  const Plane pl = plane_of(x, dw.size(2), g);
  const int64_t P = pl.Ho * pl.Wo, HW = pl.H * pl.W, kk = pl.k * pl.k;
  const int64_t tile = tile_pixels(C, P, sizeof(T));
  const int64_t tiles_per_image = (P + tile - 1) / tile;
  const T *xp = x.const_data_ptr<T>(), *wp = dw.const_data_ptr<T>();
  const auto pw2 = pw.view({O, C});
  const T *dsp = ptr_or_null<T>(ds), *dhp = ptr_or_null<T>(dh);
  const T *psp = ptr_or_null<T>(ps), *php = ptr_or_null<T>(ph);
  T* op = out.mutable_data_ptr<T>();

  at::parallel_for(0, N * tiles_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> ybuf(C * tile);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles_per_image;
      const int64_t p0 = (t % tiles_per_image) * tile, p1 = std::min(p0 + tile, P), np = p1 - p0;
      for (int64_t c = 0; c < C; ++c) {
        T* yc = ybuf.data() + c * tile;
        depthwise_span(xp + (n * C + c) * HW, wp + c * kk, yc, p0, p1, pl, g);
        act_row(yc, np, dsp, dhp, c, dw_relu);
      }
      // out[n, :, p0:p1] = pw[O, C] @ y[C, np]: BLAS writes the strided output view in place.
      T* otile = op + n * O * P + p0;
      auto y_t = at::from_blob(ybuf.data(), {C, np}, {tile, 1}, x.options());
      auto o_t = at::from_blob(otile, {O, np}, {P, 1}, x.options());
      at::mm_out(o_t, pw2, y_t);
      for (int64_t o = 0; o < O; ++o) act_row(otile + o * P, np, psp, php, o, relu);
    }
  });
}

// ---- depthwise primitives for the backward ---------------------------------------------------

at::Tensor depthwise_forward(const at::Tensor& x, const at::Tensor& w, const SepConvGeometry& g) {
  const Plane pl = plane_of(x, w.size(2), g);
  auto out = at::empty({x.size(0), x.size(1), pl.Ho, pl.Wo}, x.options());
  if (out.numel() == 0) return out;
  const int64_t C = x.size(1), P = pl.Ho * pl.Wo, kk = pl.k * pl.k;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_forward_cpu", [&] {
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc)
        depthwise_span(xp + nc * pl.H * pl.W, wp + (nc % C) * kk, op + nc * P, 0, P, pl, g);
    });
  });
  return out;
}

at::Tensor depthwise_backward_input(const at::Tensor& grad, const at::Tensor& w, int64_t H,
                                    int64_t W, const SepConvGeometry& g) {
  const int64_t N = grad.size(0), C = grad.size(1), Ho = grad.size(2), Wo = grad.size(3);
  const int64_t k = w.size(2), s = g.stride, d = g.dilation, pb = g.pad_beg;
  auto gx = at::zeros({N, C, H, W}, grad.options());
  if (gx.numel() == 0 || grad.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "depthwise_backward_input_cpu", [&] {
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *wp = w.const_data_ptr<scalar_t>();
    scalar_t* xp = gx.mutable_data_ptr<scalar_t>();
    // One plane per task: the scatter below never crosses planes, so it needs no atomics.
    at::parallel_for(0, N * C, 1, [&](int64_t b, int64_t e) {
      for (int64_t nc = b; nc < e; ++nc) {
        const scalar_t* wc = wp + (nc % C) * k * k;
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const scalar_t* grow = gp + (nc * Ho + oh) * Wo;
          for (int64_t i = 0; i < k; ++i) {
            const int64_t ih = tap_input(oh, i, s, d, pb);
            if (ih < 0 || ih >= H) continue;
            scalar_t* xrow = xp + (nc * H + ih) * W;
            for (int64_t j = 0; j < k; ++j) {
              int64_t lo, hi;
              tap_valid_range(W, Wo, j, s, d, pb, &lo, &hi);
              const scalar_t wv = wc[i * k + j];
              scalar_t* xs = xrow + (j * d - pb);
              for (int64_t ow = lo; ow < hi; ++ow) xs[ow * s] += wv * grow[ow];
            }
          }
        }
      }
    });
  });
  return gx;
}

at::Tensor depthwise_backward_weight(const at::Tensor& grad, const at::Tensor& x, int64_t k,
                                     const SepConvGeometry& g) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = grad.size(2), Wo = grad.size(3), s = g.stride, d = g.dilation, pb = g.pad_beg;
  auto gw = at::zeros({C, 1, k, k}, x.options());
  if (grad.numel() == 0) return gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward_weight_cpu", [&] {
    const scalar_t *gp = grad.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>();
    scalar_t* wp = gw.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
      std::vector<double> acc(k * k);
      for (int64_t c = b; c < e; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* xpl = xp + (n * C + c) * H * W;
          const scalar_t* gpl = gp + (n * C + c) * Ho * Wo;
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t oh = 0; oh < Ho; ++oh) {
              const int64_t ih = tap_input(oh, i, s, d, pb);
              if (ih < 0 || ih >= H) continue;
              const scalar_t* xs0 = xpl + ih * W;
              const scalar_t* grow = gpl + oh * Wo;
              for (int64_t j = 0; j < k; ++j) {
                int64_t lo, hi;
                tap_valid_range(W, Wo, j, s, d, pb, &lo, &hi);
                const scalar_t* xs = xs0 + (j * d - pb);
                scalar_t row = 0;
                for (int64_t ow = lo; ow < hi; ++ow) row += grow[ow] * xs[ow * s];
                acc[i * k + j] += row;
              }
            }
          }
        }
        for (int64_t t = 0; t < k * k; ++t) wp[c * k * k + t] = static_cast<scalar_t>(acc[t]);
      }
    });
  });
  return gw;
}

constexpr DepthwiseKernels kCpuDepthwise{depthwise_forward, depthwise_backward_input,
                                         depthwise_backward_weight};

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
  auto out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  const auto st = x.scalar_type();
  const auto xc = x.contiguous(), dwc = dw_weight.contiguous(), pwc = pw_weight.contiguous();
  const auto ds = affine_param(dw_scale, st), dh = affine_param(dw_shift, st);
  const auto ps = affine_param(pw_scale, st), ph = affine_param(pw_shift, st);
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
