// CUDA kernels of fastseg::matrix_nms_decay (masks), fastseg::matrix_nms_packed_decay (masks given
// bit-packed: step 1 becomes a gather of the rows) and fastseg::matrix_nms_boxes_decay.
//
// The positions of order are first sorted by label (stable, on the device: score order is kept
// inside a label), so every label is a contiguous run of "rows" and only the run's upper triangle
// of pairs (r < c) matters. Per row c: comp_c = max_{r<c, same label} iou_rc and
// decay_c = min(1, min_{r<c, same label} pair_decay(iou_rc, comp_r)) (ops/common/matrix_nms.h).
//
// Masks:
//   1. matrix_nms_pack_kernel: bit-packs the masks in row order, 64 pixels per word (bit b of word
//      w is pixel 64 w + b, via two __ballot_sync), rows and words zero-padded to the tile sizes,
//      and counts the areas (integer atomics: exact, order-independent). No float copy exists.
//   2. matrix_nms_tile_kernel: one block per 64 x 64 tile of the upper triangle; packed words are
//      staged through shared memory and every thread accumulates a 4 x 4 block of AND + popcount
//      intersections in registers. A tile whose rows and columns hold no common label is skipped
//      at once (labels are sorted, so one comparison decides). Its epilogue depends on n:
//      - n <= kStoreMaxN (the usual case, one or a few images): the K dimension is split over
//        blocks so that a few tiles still fill the GPU; partial counts of same-label pairs are
//        integer-atomicAdd'ed into an int32 [n, n] matrix (exact, deterministic), and two
//        warp-per-row kernels reduce each row into comp, then into the decay.
//      - larger n: the n x n matrix is never written. The tile kernel runs twice over the full K:
//        once to atomicMax comp (the IoUs are >= 0, so their double bits order as unsigned
//        integers), once, with comp final, to atomicMin the decay (as an order-preserving 64-bit
//        key: with a given mask_area the linear kernel can go negative). Max and min do not
//        depend on the order of the atomics, so the result is deterministic.
// Boxes: an IoU costs a few flops, so the two warp-per-row kernels compute it on the fly.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

#include "ops/matrix_nms.h"

namespace fastseg::ops {
namespace {

using common::DecayKernel;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Tile of 64 x 64 pairs; 16 x 16 threads with a 4 x 4 micro-tile each (8 shared loads per 16
// AND + popcount). K advances in chunks of 16 words (1024 pixels): 2 x 8 KiB of shared memory.
constexpr int kTile = 64, kMicro = 4, kLanes = kTile / kMicro, kChunk = 16;
static_assert(kLanes * kLanes == kThreads && kTile * kChunk == 4 * kThreads);
// Words one warp packs per task (pack kernel); kChunk is a multiple, so rows need no tail.
constexpr int kPackWords = 8;
static_assert(kChunk % kPackWords == 0);
// Up to this many (padded) rows the int32 intersection matrix is stored (64 MiB at most).
constexpr int64_t kStoreMaxN = 4096;
// Split-K never gives a block fewer chunks than this: the epilogue's atomics stay negligible.
constexpr int64_t kMinChunksPerSplit = 4;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// A double as a 64-bit key with the same order (negatives included): atomicMin on keys is a min
// on the values. order_key_of below is the host twin.
__device__ __forceinline__ unsigned long long order_key(double x) {
  const auto b = static_cast<unsigned long long>(__double_as_longlong(x));
  return (b >> 63) ? ~b : (b | (1ull << 63));
}
__device__ __forceinline__ double from_order_key(unsigned long long k) {
  const unsigned long long b = (k >> 63) ? (k & ~(1ull << 63)) : ~k;
  return __longlong_as_double(static_cast<long long>(b));
}

// First row of the label run that row c belongs to (lab is sorted ascending).
__device__ __forceinline__ int64_t run_start(const int64_t* __restrict__ lab, int64_t c) {
  const int64_t key = lab[c];
  int64_t lo = 0, hi = c;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (lab[mid] < key) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// ---- 1. packing -------------------------------------------------------------------------------

// bits [n_pad, words]: row r = masks[src[r]] (r < n) packed, zeros beyond n rows / hw pixels.
// counts [n_pad] (zeroed, may be null): the popcount of each row. One warp per kPackWords words
// of a row, so that even a few large masks spread over the whole GPU.
__global__ void __launch_bounds__(kThreads)
    matrix_nms_pack_kernel(const uint8_t* __restrict__ masks, const int64_t* __restrict__ src,
                           int64_t n, int64_t n_pad, int64_t hw, int64_t words,
                           uint64_t* __restrict__ bits, unsigned long long* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t groups = words / kPackWords;
  const int64_t tasks = n_pad * groups;
  const int64_t warp0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t task = warp0; task < tasks; task += nwarps) {  // uniform per warp
    const int64_t r = task / groups, g = task % groups;
    const bool live = r < n;
    const uint8_t* m = masks + (live ? src[r] * hw : 0);
    // All loads first (independent, in flight together), then the ballots.
    uint8_t v[2 * kPackWords];
#pragma unroll
    for (int k = 0; k < 2 * kPackWords; ++k) {
      const int64_t p = (g * kPackWords + k / 2) * 64 + (k % 2) * 32 + lane;
      v[k] = live && p < hw ? m[p] : 0;
    }
    uint64_t mine = 0;  // lane k keeps word k of the group
#pragma unroll
    for (int k = 0; k < kPackWords; ++k) {
      const uint32_t lo = __ballot_sync(0xffffffffu, v[2 * k] != 0);
      const uint32_t hi = __ballot_sync(0xffffffffu, v[2 * k + 1] != 0);
      if (lane == k) mine = static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
    }
    if (lane < kPackWords) bits[r * words + g * kPackWords + lane] = mine;
    if (counts != nullptr) {
      int count = __popcll(mine);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) count += __shfl_xor_sync(0xffffffffu, count, off);
      if (lane == 0 && count > 0)
        atomicAdd(counts + r, static_cast<unsigned long long>(count));
    }
  }
}

// ---- 2. tiles of intersections ----------------------------------------------------------------

enum class TileMode : int { kStore = 0, kComp = 1, kDecay = 2 };

struct TileArgs {
  const uint64_t* bits;  // [n_pad, words]
  const int64_t* lab;    // [n] sorted labels
  const double* area;    // [>= n] area of each row (kComp, kDecay)
  int64_t n, words, chunks, chunks_per_split;
  int32_t* inter;        // kStore: [n_pad, n_pad], inter[c * ld + r] for r < c
  int64_t ld;
  double* comp;                 // [n]: kComp accumulates (zeroed), kDecay reads
  unsigned long long* decay;    // [n] order keys, kDecay accumulates (set to key(1.0))
  DecayKernel kernel;
  double sigma;
};

// blockIdx.x: tile (ti, tj), ti <= tj, of the upper triangle; blockIdx.y: the K split.
// Thread (tx, ty) owns rows r0 + tx + 16 m and columns c0 + ty + 16 q (m, q < 4): rows along the
// lanes make the kStore writes inter[c * ld + r] contiguous and the column reductions a
// half-warp shuffle.
// 3 blocks per SM (<= 85 registers: the 16 counters, the next chunk's 8 words, addresses).
template <TileMode kMode>
__global__ void __launch_bounds__(kThreads, 3) matrix_nms_tile_kernel(const TileArgs a) {
  __shared__ uint64_t s_r[kChunk][kTile + 1];  // +1: conflict-free transposed stores
  __shared__ uint64_t s_c[kChunk][kTile + 1];
  __shared__ int64_t s_lab_r[kTile], s_lab_c[kTile];

  const int64_t t = blockIdx.x;
  int64_t tj = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) * 0.5);
  while (tj * (tj + 1) / 2 > t) --tj;
  while ((tj + 1) * (tj + 2) / 2 <= t) ++tj;
  const int64_t ti = t - tj * (tj + 1) / 2;
  const int64_t r0 = ti * kTile, c0 = tj * kTile;
  // Labels are sorted: an off-diagonal tile holds a same-label pair iff its last row and first
  // column share the label (r0 + 63 < c0 < n here).
  if (ti < tj && a.lab[r0 + kTile - 1] != a.lab[c0]) return;

  const int tid = threadIdx.x, tx = tid % kLanes, ty = tid / kLanes;
  if (tid < kTile) {
    s_lab_r[tid] = r0 + tid < a.n ? a.lab[r0 + tid] : 0;
  } else if (tid < 2 * kTile) {
    const int i = tid - kTile;
    s_lab_c[i] = c0 + i < a.n ? a.lab[c0 + i] : 0;
  }

  uint32_t acc[kMicro][kMicro];
#pragma unroll
  for (int m = 0; m < kMicro; ++m)
#pragma unroll
    for (int q = 0; q < kMicro; ++q) acc[m][q] = 0;

  const int64_t kc0 = blockIdx.y * a.chunks_per_split;
  const int64_t kc1 = kc0 + a.chunks_per_split < a.chunks ? kc0 + a.chunks_per_split : a.chunks;
  // Thread tid moves words (row tid / 16 + 16 p, word tid % 16) of a chunk: 128 contiguous
  // bytes per row. Loaded one chunk ahead into registers.
  const int lw = tid % kChunk, lrow = tid / kChunk;
  const uint64_t* __restrict__ gr = a.bits + (r0 + lrow) * a.words + lw;
  const uint64_t* __restrict__ gc = a.bits + (c0 + lrow) * a.words + lw;
  constexpr int kLoads = kTile * kChunk / kThreads;
  constexpr int kRowStep = kThreads / kChunk;
  uint64_t pr[kLoads], pc[kLoads];
  if (kc0 < kc1) {
#pragma unroll
    for (int p = 0; p < kLoads; ++p) {
      pr[p] = gr[p * kRowStep * a.words + kc0 * kChunk];
      pc[p] = gc[p * kRowStep * a.words + kc0 * kChunk];
    }
  }
  for (int64_t kc = kc0; kc < kc1; ++kc) {
#pragma unroll
    for (int p = 0; p < kLoads; ++p) {
      s_r[lw][lrow + p * kRowStep] = pr[p];
      s_c[lw][lrow + p * kRowStep] = pc[p];
    }
    __syncthreads();
    if (kc + 1 < kc1) {
#pragma unroll
      for (int p = 0; p < kLoads; ++p) {
        pr[p] = gr[p * kRowStep * a.words + (kc + 1) * kChunk];
        pc[p] = gc[p * kRowStep * a.words + (kc + 1) * kChunk];
      }
    }
#pragma unroll
    for (int w = 0; w < kChunk; ++w) {
      uint64_t x[kMicro], y[kMicro];
#pragma unroll
      for (int m = 0; m < kMicro; ++m) x[m] = s_r[w][tx + kLanes * m];
#pragma unroll
      for (int q = 0; q < kMicro; ++q) y[q] = s_c[w][ty + kLanes * q];
#pragma unroll
      for (int m = 0; m < kMicro; ++m)
#pragma unroll
        for (int q = 0; q < kMicro; ++q) acc[m][q] += __popcll(x[m] & y[q]);
    }
    __syncthreads();  // the next chunk overwrites s_r / s_c
  }
  __syncthreads();  // s_lab_* visible even when there was no chunk

#pragma unroll
  for (int q = 0; q < kMicro; ++q) {
    const int cl = ty + kLanes * q;
    const int64_t c = c0 + cl;
    // Column value over this thread's rows, then over the 16 lanes of the half-warp (same ty).
    double v = kMode == TileMode::kDecay ? 1.0 : 0.0;
#pragma unroll
    for (int m = 0; m < kMicro; ++m) {
      const int rl = tx + kLanes * m;
      const int64_t r = r0 + rl;
      if (!(r < c && c < a.n && s_lab_r[rl] == s_lab_c[cl])) continue;
      if constexpr (kMode == TileMode::kStore) {
        if (acc[m][q] != 0) atomicAdd(a.inter + c * a.ld + r, static_cast<int32_t>(acc[m][q]));
      } else {
        const double iou = common::iou_of(static_cast<double>(acc[m][q]), a.area[r], a.area[c]);
        if constexpr (kMode == TileMode::kComp) {
          v = fmax(v, iou);
        } else {
          v = fmin(v, common::pair_decay(iou, a.comp[r], a.kernel, a.sigma));
        }
      }
    }
    if constexpr (kMode != TileMode::kStore) {
#pragma unroll
      for (int off = kLanes / 2; off > 0; off >>= 1) {
        const double o = __shfl_xor_sync(0xffffffffu, v, off);
        v = kMode == TileMode::kComp ? fmax(v, o) : fmin(v, o);
      }
      // comp starts at 0 and the decay at 1: only a change needs an atomic.
      if (tx == 0 && c < a.n) {
        if constexpr (kMode == TileMode::kComp) {
          if (v > 0.0)
            atomicMax(reinterpret_cast<unsigned long long*>(a.comp + c),
                      static_cast<unsigned long long>(__double_as_longlong(v)));
        } else {
          if (v < 1.0) atomicMin(a.decay + c, order_key(v));
        }
      }
    }
  }
}

// out[perm[c]] = the decay of row c, from its key.
__global__ void __launch_bounds__(kThreads)
    matrix_nms_unkey_kernel(const unsigned long long* __restrict__ key,
                            const int64_t* __restrict__ perm, int64_t n,
                            double* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < n) out[perm[c]] = from_order_key(key[c]);
}

// ---- 3. row reductions (stored intersections, boxes) ------------------------------------------

// iou of rows r < c from the stored intersections.
struct StoredMaskIou {
  const int32_t* inter;  // inter[c * ld + r]
  int64_t ld;
  const double* area;
  __device__ double operator()(int64_t r, int64_t c) const {
    return common::iou_of(static_cast<double>(inter[c * ld + r]), area[r], area[c]);
  }
};

struct BoxIou {
  const double* boxes;  // [n, 4] in row order
  __device__ double operator()(int64_t r, int64_t c) const {
    return common::box_iou(boxes + 4 * r, boxes + 4 * c);
  }
};

// comp[c] = max(0, max_{r in run, r < c} iou(r, c)); one warp per row, lanes along r.
template <typename Iou>
__global__ void __launch_bounds__(kThreads)
    matrix_nms_comp_rows_kernel(const Iou iou, const int64_t* __restrict__ lab, int64_t n,
                                double* __restrict__ comp) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (c >= n) return;  // uniform per warp
  double v = 0.0;
  for (int64_t r = run_start(lab, c) + lane; r < c; r += 32) v = fmax(v, iou(r, c));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) comp[c] = v;
}

// out[perm[c]] = min(1, min_{r in run, r < c} pair_decay(iou(r, c), comp[r])).
template <typename Iou>
__global__ void __launch_bounds__(kThreads)
    matrix_nms_decay_rows_kernel(const Iou iou, const int64_t* __restrict__ lab, int64_t n,
                                 const double* __restrict__ comp,
                                 const int64_t* __restrict__ perm, DecayKernel kernel,
                                 double sigma, double* __restrict__ out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (c >= n) return;
  double v = 1.0;  // fmin drops a NaN, as std::min(v, NaN) keeps v in the CPU kernel
  for (int64_t r = run_start(lab, c) + lane; r < c; r += 32)
    v = fmin(v, common::pair_decay(iou(r, c), comp[r], kernel, sigma));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) out[perm[c]] = v;
}

// ---- host side --------------------------------------------------------------------------------

unsigned row_blocks(int64_t n) { return static_cast<unsigned>(ceil_div(n, kWarps)); }

// comp, then the decay scattered back to positions, from an IoU functor over sorted rows.
template <typename Iou>
at::Tensor decay_from_rows(const Iou& iou, const at::Tensor& lab, const at::Tensor& perm,
                           DecayKernel kernel, double sigma) {
  const int64_t n = lab.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto comp = at::empty({n}, lab.options().dtype(at::kDouble));
  auto out = at::empty({n}, lab.options().dtype(at::kDouble));
  matrix_nms_comp_rows_kernel<Iou><<<row_blocks(n), kThreads, 0, stream>>>(
      iou, lab.const_data_ptr<int64_t>(), n, comp.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  matrix_nms_decay_rows_kernel<Iou><<<row_blocks(n), kThreads, 0, stream>>>(
      iou, lab.const_data_ptr<int64_t>(), n, comp.const_data_ptr<double>(),
      perm.const_data_ptr<int64_t>(), kernel, sigma, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Labels of order's positions, sorted (stable: score order inside a label), and the position of
// each sorted row. No host sync.
std::tuple<at::Tensor, at::Tensor> sorted_labels(const at::Tensor& labels,
                                                 const at::Tensor& order) {
  const auto lab = labels.index_select(0, order).to(at::kLong);
  auto [sorted, perm] = at::sort(lab, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {sorted.contiguous(), perm.contiguous()};
}

uint64_t order_key_of(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return (b >> 63) ? ~b : (b | (uint64_t{1} << 63));
}

// The decay of packed rows: bits [n_pad, words] (row r = the r-th position in sorted-label order,
// zero rows past n, words a multiple of kChunk), area [n] of the rows. Steps 2a / 2b above.
at::Tensor decay_of_packed(const at::Tensor& bits, const at::Tensor& area, const at::Tensor& lab,
                           const at::Tensor& perm, DecayKernel k, double sigma) {
  const int64_t n = lab.size(0), n_pad = bits.size(0), words = bits.size(1);
  const int64_t chunks = words / kChunk;
  const int64_t tiles_side = n_pad / kTile, tiles = tiles_side * (tiles_side + 1) / 2;
  const int sms = sm_count();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dopts = area.options().dtype(at::kDouble);
  TileArgs args{};
  args.bits = reinterpret_cast<const uint64_t*>(bits.const_data_ptr<int64_t>());
  args.lab = lab.const_data_ptr<int64_t>();
  args.area = area.const_data_ptr<double>();
  args.n = n;
  args.words = words;
  args.chunks = chunks;
  args.kernel = k;
  args.sigma = sigma;

  if (n_pad <= kStoreMaxN) {
    // 2a. Few tiles: split K so that the GPU fills (the worst case, one label, has all `tiles`
    // busy), but keep >= kMinChunksPerSplit chunks per block.
    int64_t splits = std::max<int64_t>(1, ceil_div(4 * int64_t{sms}, tiles));
    splits = std::min(splits, std::max<int64_t>(1, chunks / kMinChunksPerSplit));
    args.chunks_per_split = chunks > 0 ? ceil_div(chunks, splits) : 0;
    splits = chunks > 0 ? ceil_div(chunks, args.chunks_per_split) : 1;
    auto inter = at::zeros({n_pad * n_pad}, bits.options().dtype(at::kInt));
    args.inter = inter.mutable_data_ptr<int32_t>();
    args.ld = n_pad;
    matrix_nms_tile_kernel<TileMode::kStore>
        <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)), kThreads, 0,
           stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return decay_from_rows(StoredMaskIou{inter.const_data_ptr<int32_t>(), n_pad,
                                         area.const_data_ptr<double>()},
                           lab, perm, k, sigma);
  }

  // 2b. Many tiles: two full-K passes, atomics into comp and the decay keys.
  auto comp = at::zeros({n}, dopts);
  auto keys = at::full({n}, static_cast<int64_t>(order_key_of(1.0)),
                       bits.options().dtype(at::kLong));
  args.chunks_per_split = chunks;
  args.comp = comp.mutable_data_ptr<double>();
  args.decay = reinterpret_cast<unsigned long long*>(keys.mutable_data_ptr<int64_t>());
  matrix_nms_tile_kernel<TileMode::kComp>
      <<<dim3(static_cast<unsigned>(tiles), 1), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  matrix_nms_tile_kernel<TileMode::kDecay>
      <<<dim3(static_cast<unsigned>(tiles), 1), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = at::empty({n}, dopts);
  matrix_nms_unkey_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                            stream>>>(
      reinterpret_cast<const unsigned long long*>(keys.const_data_ptr<int64_t>()),
      perm.const_data_ptr<int64_t>(), n, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor matrix_nms_decay_cuda(const at::Tensor& masks, const at::Tensor& labels,
                                 const at::Tensor& order,
                                 const std::optional<at::Tensor>& mask_area,
                                 c10::string_view kernel, double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_decay_check(masks, labels, order, mask_area, sigma);
  TORCH_CHECK(masks.is_cuda(), "masks must be a CUDA tensor for the cuda kernel, got ",
              masks.device());
  c10::cuda::CUDAGuard device_guard(masks.device());
  const int64_t n = order.size(0);
  const auto dopts = masks.options().dtype(at::kDouble);
  if (n == 0) return at::empty({0}, dopts);
  const int64_t hw = masks.size(1) * masks.size(2);
  // Intersections are counted in 32-bit integers.
  TORCH_CHECK(hw <= std::numeric_limits<int32_t>::max(),
              "masks must have fewer than 2^31 pixels (H*W) for the cuda kernel, got ", hw);
  const int64_t tiles_side = ceil_div(n, kTile);
  TORCH_CHECK(tiles_side <= 65535, "too many masks for the cuda kernel: ", n);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const auto [lab, perm] = sorted_labels(labels, order);
  const auto src = order.index_select(0, perm);  // mask index of each sorted row
  const int64_t n_pad = tiles_side * kTile;
  const int64_t words = ceil_div(ceil_div(hw, 64), kChunk) * kChunk;

  // 1. Pack (and count the areas unless given).
  const auto m = masks.contiguous();
  auto bits = at::empty({n_pad * words}, masks.options().dtype(at::kLong));
  at::Tensor counts;
  if (!mask_area.has_value()) counts = at::zeros({n_pad}, masks.options().dtype(at::kLong));
  const int sms = sm_count();
  if (n_pad * words > 0) {
    const int64_t tasks = n_pad * (words / kPackWords);
    const auto blocks = std::min<int64_t>(ceil_div(tasks, kWarps), int64_t{sms} * 32);
    matrix_nms_pack_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        reinterpret_cast<const uint8_t*>(m.const_data_ptr()), src.const_data_ptr<int64_t>(), n,
        n_pad, hw, words, reinterpret_cast<uint64_t*>(bits.mutable_data_ptr<int64_t>()),
        counts.defined() ? reinterpret_cast<unsigned long long*>(counts.mutable_data_ptr<int64_t>())
                         : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto area = mask_area.has_value()
                        ? mask_area->index_select(0, src).to(at::kDouble).contiguous()
                        : counts.to(at::kDouble);

  return decay_of_packed(bits.view({n_pad, words}), area, lab, perm, k, sigma);
}

// Masks given packed, with their areas: the rows are gathered in sorted-label order and padded to
// the tile sizes; the rest is the same path.
at::Tensor matrix_nms_packed_decay_cuda(const at::Tensor& masks, const at::Tensor& labels,
                                        const at::Tensor& order, const at::Tensor& mask_area,
                                        c10::string_view kernel, double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_packed_decay_check(masks, labels, order, mask_area, sigma);
  TORCH_CHECK(masks.is_cuda(), "masks must be a CUDA tensor for the cuda kernel, got ",
              masks.device());
  c10::cuda::CUDAGuard device_guard(masks.device());
  const int64_t n = order.size(0), words_in = masks.size(1);
  if (n == 0) return at::empty({0}, masks.options().dtype(at::kDouble));
  TORCH_CHECK(words_in * 64 <= std::numeric_limits<int32_t>::max(),
              "masks must have fewer than 2^31 pixels for the cuda kernel, got ", words_in * 64);
  const int64_t tiles_side = ceil_div(n, kTile);
  TORCH_CHECK(tiles_side <= 65535, "too many masks for the cuda kernel: ", n);
  const auto [lab, perm] = sorted_labels(labels, order);
  const auto src = order.index_select(0, perm);
  const int64_t n_pad = tiles_side * kTile;
  const int64_t words = ceil_div(std::max<int64_t>(words_in, 1), kChunk) * kChunk;
  auto bits = at::zeros({n_pad, words}, masks.options());
  bits.narrow(0, 0, n).narrow(1, 0, words_in).copy_(masks.index_select(0, src));
  const auto area = mask_area.index_select(0, src).to(at::kDouble).contiguous();
  return decay_of_packed(bits, area, lab, perm, k, sigma);
}

at::Tensor matrix_nms_boxes_decay_cuda(const at::Tensor& boxes, const at::Tensor& labels,
                                       const at::Tensor& order, c10::string_view kernel,
                                       double sigma) {
  const DecayKernel k = decay_kernel(kernel);
  matrix_nms_boxes_decay_check(boxes, labels, order, sigma);
  TORCH_CHECK(boxes.is_cuda(), "boxes must be a CUDA tensor for the cuda kernel, got ",
              boxes.device());
  c10::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = order.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kDouble));
  const auto [lab, perm] = sorted_labels(labels, order);
  const auto b = boxes.index_select(0, order.index_select(0, perm)).to(at::kDouble).contiguous();
  return decay_from_rows(BoxIou{b.const_data_ptr<double>()}, lab, perm, k, sigma);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("matrix_nms_decay", &matrix_nms_decay_cuda);
  m.impl("matrix_nms_packed_decay", &matrix_nms_packed_decay_cuda);
  m.impl("matrix_nms_boxes_decay", &matrix_nms_boxes_decay_cuda);
}

}  // namespace fastseg::ops
