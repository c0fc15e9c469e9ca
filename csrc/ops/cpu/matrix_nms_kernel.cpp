// CPU kernels of fastseg::matrix_nms_decay (masks), fastseg::matrix_nms_packed_decay (masks given
// bit-packed) and fastseg::matrix_nms_boxes_decay.
//
// Only same-label pairs decay each other, so the positions of order are grouped by label (a
// stable sort keeps score order inside a group) and each group's lower triangle of IoUs is
// computed once: row b holds iou(a, b) for the higher-scored a < b, contiguous. Then comp (row
// max) and the decay (row min of f(iou)/f(comp_a)) are two more passes over the same rows. Masks
// are bit-packed first (64 pixels per word), so an intersection is AND + popcount over HW/64
// words; no float copy of the masks exists. Rows of all groups are processed in parallel, paired
// (b, g-1-b) so that every task does the same work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops/matrix_nms.h"

namespace fastseg::ops {
namespace {

using common::DecayKernel;

// popcount(a[i] & b[i]) summed over n words.
FASTSEG_CPU_CLONES int64_t and_popcount(const uint64_t* __restrict__ a,
                                        const uint64_t* __restrict__ b, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += __builtin_popcountll(a[i] & b[i]);
  return count;
}

FASTSEG_CPU_CLONES void pack_bits(const uint8_t* __restrict__ m, int64_t n,
                                  uint64_t* __restrict__ out) {
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t end = std::min<int64_t>(64, n - w * 64);
    uint64_t word = 0;
    for (int64_t i = 0; i < end; ++i) word |= static_cast<uint64_t>(m[w * 64 + i] != 0) << i;
    out[w] = word;
  }
}

// Decay factors of positions 0..n) given the label of each position and iou(a, b) for positions
// a, b of one label with a before b.
template <typename IouFn>
at::Tensor grouped_decay(const std::vector<int64_t>& label_of, IouFn iou, DecayKernel kernel,
                         double sigma, const at::TensorOptions& opts) {
  const int64_t n = static_cast<int64_t>(label_of.size());
  std::vector<int64_t> pos(n);
  std::iota(pos.begin(), pos.end(), 0);
  std::stable_sort(pos.begin(), pos.end(),
                   [&](int64_t a, int64_t b) { return label_of[a] < label_of[b]; });
  // Group g is pos[start[g] .. start[g+1]); its g_size^2 lower triangle lives at tri[base[g]].
  std::vector<int64_t> start{0}, base{0};
  for (int64_t i = 1; i <= n; ++i) {
    if (i == n || label_of[pos[i]] != label_of[pos[i - 1]]) {
      const int64_t size = i - start.back();
      base.push_back(base.back() + size * size);
      start.push_back(i);
    }
  }
  const int64_t groups = static_cast<int64_t>(start.size()) - 1;
  // Balanced tasks: (group, row b) with its mirror row g-1-b.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t b = 0; b < (start[g + 1] - start[g] + 1) / 2; ++b) tasks.emplace_back(g, b);
  std::vector<double> tri(base.back()), comp(n, 0.0);
  auto for_rows = [&](auto&& row_fn) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto [g, b] = tasks[t];
        const int64_t size = start[g + 1] - start[g];
        row_fn(g, size, b);
        if (size - 1 - b != b) row_fn(g, size, size - 1 - b);
      }
    });
  };
  // Pass 1: the IoUs; comp of each row (max over the higher-scored).
  for_rows([&](int64_t g, int64_t size, int64_t b) {
    const int64_t* p = pos.data() + start[g];
    double* row = tri.data() + base[g] + b * size;
    double c = 0.0;
    for (int64_t a = 0; a < b; ++a) {
      row[a] = iou(p[a], p[b]);
      c = std::max(c, row[a]);
    }
    comp[p[b]] = c;
  });
  // Pass 2: the decay of each row.
  auto decay = at::empty({n}, opts.dtype(at::kDouble));
  double* d = decay.mutable_data_ptr<double>();
  for_rows([&](int64_t g, int64_t size, int64_t b) {
    const int64_t* p = pos.data() + start[g];
    const double* row = tri.data() + base[g] + b * size;
    double v = 1.0;
    for (int64_t a = 0; a < b; ++a)
      v = std::min(v, common::pair_decay(row[a], comp[p[a]], kernel, sigma));
    d[p[b]] = v;
  });
  return decay;
}

std::vector<int64_t> labels_in_order(const at::Tensor& labels, const at::Tensor& order) {
  const auto lab = labels.index_select(0, order).to(at::kLong).contiguous();
  const int64_t* lp = lab.const_data_ptr<int64_t>();
  return std::vector<int64_t>(lp, lp + lab.numel());
}

at::Tensor matrix_nms_decay_cpu(const at::Tensor& masks, const at::Tensor& labels,
                                const at::Tensor& order,
                                const std::optional<at::Tensor>& mask_area,
                                c10::string_view kernel, double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_decay_check(masks, labels, order, mask_area, sigma);
  TORCH_CHECK(masks.device().is_cpu(), "masks must be a CPU tensor for the cpu kernel");
  const int64_t n = order.size(0), hw = masks.size(1) * masks.size(2);
  const int64_t words = (hw + 63) / 64;
  // Bit-packed masks in score order, and their areas (popcounts unless given).
  std::vector<uint64_t> bits(n * words);
  std::vector<double> area(n);
  const auto m = masks.contiguous();
  const auto* mp = reinterpret_cast<const uint8_t*>(m.const_data_ptr());
  const int64_t* op = order.const_data_ptr<int64_t>();
  at::parallel_for(0, n, 8, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      uint64_t* row = bits.data() + j * words;
      pack_bits(mp + op[j] * hw, hw, row);
      area[j] = static_cast<double>(and_popcount(row, row, words));
    }
  });
  if (mask_area.has_value()) {
    const auto a = mask_area->index_select(0, order).to(at::kDouble).contiguous();
    std::copy_n(a.const_data_ptr<double>(), n, area.begin());
  }
  auto iou = [&](int64_t a, int64_t b) {
    const auto inter = and_popcount(bits.data() + a * words, bits.data() + b * words, words);
    return common::iou_of(static_cast<double>(inter), area[a], area[b]);
  };
  return grouped_decay(labels_in_order(labels, order), iou, k, sigma, masks.options());
}

// Masks already packed (as fastseg::dynamic_mask_head returns them), with their areas: the rows
// are read in place through order, no copy.
at::Tensor matrix_nms_packed_decay_cpu(const at::Tensor& bits, const at::Tensor& labels,
                                       const at::Tensor& order, const at::Tensor& mask_area,
                                       c10::string_view kernel, double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_packed_decay_check(bits, labels, order, mask_area, sigma);
  TORCH_CHECK(bits.device().is_cpu(), "masks must be a CPU tensor for the cpu kernel");
  const int64_t words = bits.size(1);
  const auto b = bits.contiguous();
  const auto* bp = reinterpret_cast<const uint64_t*>(b.const_data_ptr<int64_t>());
  const int64_t* op = order.const_data_ptr<int64_t>();
  const auto a = mask_area.index_select(0, order).to(at::kDouble).contiguous();
  const double* area = a.const_data_ptr<double>();
  auto iou = [&](int64_t i, int64_t j) {
    const auto inter = and_popcount(bp + op[i] * words, bp + op[j] * words, words);
    return common::iou_of(static_cast<double>(inter), area[i], area[j]);
  };
  return grouped_decay(labels_in_order(labels, order), iou, k, sigma, bits.options());
}

at::Tensor matrix_nms_boxes_decay_cpu(const at::Tensor& boxes, const at::Tensor& labels,
                                      const at::Tensor& order, c10::string_view kernel,
                                      double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_boxes_decay_check(boxes, labels, order, sigma);
  TORCH_CHECK(boxes.device().is_cpu(), "boxes must be a CPU tensor for the cpu kernel");
  const auto b = boxes.index_select(0, order).to(at::kDouble).contiguous();
  const double* bp = b.const_data_ptr<double>();
  auto iou = [&](int64_t i, int64_t j) { return common::box_iou(bp + 4 * i, bp + 4 * j); };
  return grouped_decay(labels_in_order(labels, order), iou, k, sigma, boxes.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("matrix_nms_decay", &matrix_nms_decay_cpu);
  m.impl("matrix_nms_packed_decay", &matrix_nms_packed_decay_cpu);
  m.impl("matrix_nms_boxes_decay", &matrix_nms_boxes_decay_cpu);
}

}  // namespace fastseg::ops
