// libtorch C++ test of fastseg::separable_conv2d, called through the dispatcher exactly as a C++
// user of libfastseg.so would. Expected values are worked out by hand below (no torch op computes
// them). Exit status 0 when every check passes; each failure prints a line.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                                  \
  do {                                                                    \
    ++g_checks;                                                           \
    if (!(cond)) {                                                        \
      ++g_failures;                                                       \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                  \
      std::fprintf(stderr, "\n");                                         \
    }                                                                     \
  } while (0)

using OptT = std::optional<at::Tensor>;
using SepConvFn = at::Tensor(const at::Tensor& x, const at::Tensor& dw_weight,
                             const at::Tensor& pw_weight, const OptT& dw_scale,
                             const OptT& dw_shift, const OptT& pw_scale, const OptT& pw_shift,
                             int64_t stride, int64_t pad_beg, int64_t pad_end, int64_t dilation,
                             bool dw_relu, bool relu);

c10::TypedOperatorHandle<SepConvFn> op() {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("fastseg::separable_conv2d", "")
                           .typed<SepConvFn>();
  return handle;
}

at::Tensor make(const std::vector<double>& v, at::IntArrayRef shape, const at::TensorOptions& o) {
  return at::tensor(v, at::TensorOptions().dtype(at::kDouble)).reshape(shape).to(o);
}

// Compares element by element (flattened, row-major) with a printed diagnostic on mismatch.
void expect_values(const std::string& what, const at::Tensor& got, at::IntArrayRef shape,
                   const std::vector<double>& want, double tol) {
  EXPECT(got.sizes() == shape, "%s: shape mismatch", what.c_str());
  if (got.sizes() != shape) return;
  const auto g = got.to(at::kCPU, at::kDouble).contiguous();
  const double* gp = g.const_data_ptr<double>();
  EXPECT(static_cast<size_t>(g.numel()) == want.size(), "%s: %lld values, expected %zu",
        what.c_str(), static_cast<long long>(g.numel()), want.size());
  for (int64_t i = 0; i < g.numel() && static_cast<size_t>(i) < want.size(); ++i) {
    EXPECT(std::abs(gp[i] - want[i]) <= tol, "%s: element %lld = %.9g, expected %.9g",
          what.c_str(), static_cast<long long>(i), gp[i], want[i]);
  }
}

// Runs `fn`, which must throw c10::Error whose message mentions `needle` (the bad argument).
void expect_error(const std::string& what, const std::function<void()>& fn,
                  const std::string& needle) {
  try {
    fn();
    EXPECT(false, "%s: no error raised", what.c_str());
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    EXPECT(msg.find(needle) != std::string::npos, "%s: message does not name '%s': %s",
          what.c_str(), needle.c_str(), msg.c_str());
  } catch (const std::exception& e) {
    EXPECT(false, "%s: expected c10::Error, got another exception: %s", what.c_str(), e.what());
  }
}

// x: [1, 2, 3, 3]
//   channel 0:  1  2  3      channel 1 (case 1):  1  0 -1
//               4  5  6                           2  0 -2
//               7  8  9                           0  1  0
const std::vector<double> kX0 = {1, 2, 3, 4, 5, 6, 7, 8, 9};
const std::vector<double> kX1Case1 = {1, 0, -1, 2, 0, -2, 0, 1, 0};
// dw_weight channel 0: a "plus" stencil.
const std::vector<double> kPlus = {0, 1, 0, 1, 1, 1, 0, 1, 0};
// pw_weight [2, 2, 1, 1]: out0 = y0 - y1, out1 = 0.25*y0 + 2*y1.
const std::vector<double> kPw = {1, -1, 0.25, 2};

// Case 1: k=3, stride 1, dilation 1, padding "same" (1, 1); both affines and both ReLUs.
void case_affine_relu(const at::TensorOptions& o, double tol, const std::string& tag) {
  // dw_weight channel 1: +1 at the top-left tap, -1 at the bottom-right tap.
  const std::vector<double> dw1 = {1, 0, 0, 0, 0, 0, 0, 0, -1};
  std::vector<double> xv = kX0, dwv = kPlus;
  xv.insert(xv.end(), kX1Case1.begin(), kX1Case1.end());
  dwv.insert(dwv.end(), dw1.begin(), dw1.end());
  const auto x = make(xv, {1, 2, 3, 3}, o);
  const auto dw = make(dwv, {2, 1, 3, 3}, o);
  const auto pw = make(kPw, {2, 2, 1, 1}, o);
  const auto dw_scale = make({0.5, 2}, {2}, o), dw_shift = make({-10, 1}, {2}, o);
  const auto pw_scale = make({2, -1}, {2}, o), pw_shift = make({1, 4}, {2}, o);

  // Depthwise, zero padding, a[i][j] = sum_pq w[p][q] x[i-1+p][j-1+q]:
  //   a0 = x + up + down + left + right      a1 = x1[i-1][j-1] - x1[i+1][j+1]
  //        7 11 11                                0  2  0
  //       17 25 23                               -1  1  0
  //       19 29 23                                0  2  0
  // dw affine + ReLU:  y0 = relu(0.5*a0 - 10)  y1 = relu(2*a1 + 1)
  //        0   0   0                              1  5  1
  //        0 2.5 1.5                              0  3  1
  //        0 4.5 1.5                              1  5  1
  // pointwise:  z0 = y0 - y1                   z1 = 0.25*y0 + 2*y1
  //       -1   -5   -1                            2  10      2
  //        0 -0.5  0.5                            0  6.625   2.375
  //       -1 -0.5  0.5                            2  11.125  2.375
  // pw affine + ReLU: out0 = relu(2*z0 + 1)    out1 = relu(-z1 + 4)
  //        0 0 0                                  2 0 2
  //        1 0 2                                  4 0 1.625
  //        0 0 2                                  2 0 1.625
  const std::vector<double> want = {0, 0, 0, 1, 0, 2, 0, 0, 2,  //
                                    2, 0, 2, 4, 0, 1.625, 2, 0, 1.625};
  const auto out = op().call(x, dw, pw, dw_scale, dw_shift, pw_scale, pw_shift, /*stride=*/1,
                             /*pad_beg=*/1, /*pad_end=*/1, /*dilation=*/1, /*dw_relu=*/true,
                             /*relu=*/true);
  EXPECT(out.scalar_type() == o.dtype().toScalarType(), "%s: output dtype changed", tag.c_str());
  EXPECT(out.device() == o.device(), "%s: output on another device", tag.c_str());
  expect_values(tag + " affine+relu", out, {1, 2, 3, 3}, want, tol);

  // The same call with a channels_last (non-contiguous) x must give the same answer.
  const auto out_cl = op().call(x.contiguous(at::MemoryFormat::ChannelsLast), dw, pw, dw_scale,
                                dw_shift, pw_scale, pw_shift, 1, 1, 1, 1, true, true);
  expect_values(tag + " affine+relu channels_last", out_cl, {1, 2, 3, 3}, want, tol);
}

// Case 2: stride 2, dilation 2, fixed padding of k_eff = 5: (2, 2); no affine, no ReLU.
// Output o (rows and columns alike) reads input o*2 - 2 + 2t for tap t:
//   o = 0: taps 1, 2 -> inputs 0, 2        o = 1: taps 0, 1 -> inputs 0, 2
// so only the four corners of x are read (the centre cross of channel 1 is 100 on purpose).
void case_stride_dilation(const at::TensorOptions& o, double tol, const std::string& tag) {
  const std::vector<double> x1 = {2, 100, -3, 100, 100, 100, 5, 100, 7};
  const std::vector<double> dw1 = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<double> xv = kX0, dwv = kPlus;
  xv.insert(xv.end(), x1.begin(), x1.end());
  dwv.insert(dwv.end(), dw1.begin(), dw1.end());
  const auto x = make(xv, {1, 2, 3, 3}, o);
  const auto dw = make(dwv, {2, 1, 3, 3}, o);
  const auto pw = make(kPw, {2, 2, 1, 1}, o);
  // Corners: channel 0 x00=1 x02=3 x20=7 x22=9; channel 1 x00=2 x02=-3 x20=5 x22=7.
  // a[0][0] = w11 x00 + w12 x02 + w21 x20 + w22 x22
  // a[0][1] = w10 x00 + w11 x02 + w20 x20 + w21 x22
  // a[1][0] = w01 x00 + w02 x02 + w11 x20 + w12 x22
  // a[1][1] = w00 x00 + w01 x02 + w10 x20 + w11 x22
  //   plus stencil:  a0 = [1+3+7+0, 1+3+0+9; 1+0+7+9, 0+3+7+9] = [11 13; 17 19]
  //   taps 1..9:     a1 = [10-18+40+63, 8-15+35+56; 4-9+25+42, 2-6+20+35] = [95 84; 62 51]
  // out0 = a0 - a1        = [-84 -71; -45 -32]
  // out1 = 0.25*a0 + 2*a1 = [192.75 171.25; 128.25 106.75]
  const std::vector<double> want = {-84, -71, -45, -32, 192.75, 171.25, 128.25, 106.75};
  const auto out = op().call(x, dw, pw, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                             /*stride=*/2, /*pad_beg=*/2, /*pad_end=*/2, /*dilation=*/2,
                             /*dw_relu=*/false, /*relu=*/false);
  expect_values(tag + " stride2 dilation2", out, {1, 2, 2, 2}, want, tol);
}

// An empty batch is a valid input and gives an empty output of the right shape.
void case_empty(const at::TensorOptions& o, const std::string& tag) {
  const auto x = at::empty({0, 2, 3, 3}, o);
  const auto dw = make(std::vector<double>(18, 1.0), {2, 1, 3, 3}, o);
  const auto pw = make(kPw, {2, 2, 1, 1}, o);
  const auto out = op().call(x, dw, pw, std::nullopt, std::nullopt, std::nullopt, std::nullopt, 1,
                             1, 1, 1, false, false);
  EXPECT(out.sizes() == at::IntArrayRef({0, 2, 3, 3}), "%s empty batch: wrong output shape",
        tag.c_str());
}

// Bad input must raise c10::Error (RuntimeError in Python) naming the argument.
void case_bad_input(const at::TensorOptions& o, const std::string& tag) {
  const auto x = make(std::vector<double>(18, 1.0), {1, 2, 3, 3}, o);
  const auto dw = make(std::vector<double>(18, 1.0), {2, 1, 3, 3}, o);
  const auto pw = make(kPw, {2, 2, 1, 1}, o);
  const auto none = std::nullopt;
  // dw_weight with a non-square kernel [C, 1, 3, 2].
  expect_error(tag + " bad dw_weight shape", [&] {
    op().call(x, at::ones({2, 1, 3, 2}, o), pw, none, none, none, none, 1, 1, 1, 1, false, false);
  }, "dw_weight");
  // pw_scale of length 3 where O = 2.
  expect_error(tag + " bad pw_scale length", [&] {
    op().call(x, dw, pw, none, none, at::ones({3}, o), none, 1, 1, 1, 1, false, true);
  }, "pw_scale");
  // 3-D x.
  expect_error(tag + " bad x rank", [&] {
    op().call(x[0], dw, pw, none, none, none, none, 1, 1, 1, 1, false, false);
  }, "x must be 4-D");
  // stride 0.
  expect_error(tag + " bad stride", [&] {
    op().call(x, dw, pw, none, none, none, none, 0, 1, 1, 1, false, false);
  }, "stride");
}

}  // namespace

int main() {
  try {
    const auto& schema = op().schema();
    std::printf("found %s\n", c10::toString(schema).c_str());

    std::vector<std::pair<std::string, at::TensorOptions>> configs = {
        {"cpu float32", at::TensorOptions().dtype(at::kFloat)},
        {"cpu float64", at::TensorOptions().dtype(at::kDouble)},
    };
#ifdef FASTSEG_WITH_CUDA
    if (at::hasCUDA()) {
      configs.push_back({"cuda float32", at::TensorOptions().dtype(at::kFloat).device(at::kCUDA)});
      configs.push_back({"cuda float64", at::TensorOptions().dtype(at::kDouble).device(at::kCUDA)});
    } else {
      std::printf("built with CUDA kernels but no GPU is visible: CUDA cases skipped\n");
    }
#endif
    for (const auto& [tag, o] : configs) {
      // Every expected value is a short sum of small dyadic numbers: exact in float32 too.
      const double tol = o.dtype() == at::kFloat ? 1e-5 : 1e-12;
      case_affine_relu(o, tol, tag);
      case_stride_dilation(o, tol, tag);
      case_empty(o, tag);
      case_bad_input(o, tag);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL: unexpected exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
