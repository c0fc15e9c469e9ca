// CUDA kernels of fastseg::dense_crf and fastseg::_dense_crf_backward.
//
// Same algorithm and semantics as the CPU kernel (ops/cpu/dense_crf_kernel.cpp): per image, one
// permutohedral lattice (ops/common/permutohedral.h) for the Gaussian on (x, y) / pos_sxy (D = 2)
// and one for the bilateral on ((x, y) / bi_sxy, rgb / bi_srgb) (D = 5), built once and reused by
// every iteration and every label.
//
// Images are processed in chunks of whole images (a host loop; usually a single chunk, see
// kChunkPixels): a chunk's pixels are concatenated (P = N H W) and every kernel below runs over
// all of them at once. A lattice key carries the image index after its D coordinates, so images
// never share a vertex and neighbours stay within their image: each image gets exactly its own
// lattice. Host syncs per call: one for the input check, plus one per lattice and chunk (the
// vertex count), so 3 for a single chunk.
//
// Lattice construction, per entry i = p (D+1) + r (vertex r of pixel p's simplex):
//  1. simplex_kernel: features, simplex, weights and the (D+1)-int key of every entry.
//  2. insert_kernel: the keys go into an open-addressing table (linear probing, load <= 1/2).
//     A slot holds an entry index: atomicCAS claims an empty slot, keys are compared through the
//     entry's precomputed key, and atomicMin leaves the *smallest* entry of each key in its slot.
//  3. Vertices are the keys' smallest entries, numbered by a scan over "i is the smallest entry of
//     its key": order of first appearance, whatever the hash races. Images are concatenated in
//     order, so within each image this is the CPU's numbering (shifted by the earlier images').
//  4. neighbour_kernel: v - e_j and v + e_j looked up per vertex and direction (-1: absent).
//  5. CSR by vertex for the splat: a stable sort of the entries by vertex, so that each vertex
//     sums its pixels in pixel order (the CPU's order). The splat is then a gather per vertex:
//     no float atomics, results are bit-identical run to run.
// The symmetric normalisation D^-1/2 (D = the lattice's own filtering of a ones vector) and the
// Potts compatibility are folded into the weights as on the CPU: splat_w = w norm,
// slice_w = w (norm compat).
//
// Values are pixel-major rows [P, C] (all labels at once) and lattice values [M, C]; splat and
// blur use one thread per (vertex, label), so a row is read by consecutive threads. The blur
// along e_j is out[v] = in[v] + (in[v - e_j] + in[v + e_j]) / 2 (absent neighbours count 0),
// ping-ponging between two buffers (race-free); it equals the CPU's in-place chain sweep. Slice +
// softmax: a group of G = pow2 >= min(C, 32) lanes per pixel, reductions with warp shuffles.
//
// The lattice filter is S^T B_D ... B_0 S (B_j symmetric), so its adjoint blurs the directions
// in reverse order; the backward stores the trajectory Q_0..Q_T and walks it back like the CPU.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "ops/common/permutohedral.h"
#include "ops/dense_crf.h"

namespace fastseg::ops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride kernels need no more to fill a GPU
constexpr int kEmpty = std::numeric_limits<int32_t>::max();  // empty hash slot (> every entry)
// Most pixels per chunk: the bilateral lattice's table, 2 P (D+1) = 12 P slots rounded up to a
// power of two, must stay <= 2^31 slots, so that slots and entries fit an int.
constexpr int64_t kMaxPixels = std::numeric_limits<int32_t>::max() / 12;
// Pixels per chunk when it holds several images: plenty to fill a GPU, and it bounds the
// lattices' memory (~0.6 KB per pixel while one is built) independently of the batch size.
constexpr int64_t kChunkPixels = int64_t(1) << 22;
static_assert(kChunkPixels <= kMaxPixels);

using Params = DenseCrfParams;

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

#define FASTSEG_GRID_STRIDE(i, n)                                                          \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); \
       i += int64_t(gridDim.x) * blockDim.x)

// ---- lattice construction ----------------------------------------------------------------------

template <int D>
struct Scale {
  float v[D];
};

// keys [P K, D + 1], w [P K]: the simplex vertices' keys and barycentric weights of the P pixels
// of a batch of images of HW pixels each. A key is the vertex's D coordinates, then the image.
// Features as on the CPU: (x, y) / sxy, then (for D = 5) rgb / srgb; image [N, 3, HW].
template <int D>
__global__ void simplex_kernel(const float* __restrict__ image, int64_t P, int64_t HW, int64_t W,
                               float sxy, float srgb, Scale<D> scale, int* __restrict__ keys,
                               float* __restrict__ w) {
  constexpr int K = D + 1;
  FASTSEG_GRID_STRIDE(p, P) {
    const int64_t b = p / HW, i = p - b * HW;  // image, pixel in the image
    float f[D];
    f[0] = static_cast<float>(i % W) / sxy;
    f[1] = static_cast<float>(i / W) / sxy;
    if constexpr (D == 5) {
#pragma unroll
      for (int k = 0; k < 3; ++k) f[2 + k] = image[(b * 3 + k) * HW + i] / srgb;
    }
    common::LatticeSimplex<D> s;
    common::lattice_simplex<D>(f, scale.v, s);
#pragma unroll
    for (int r = 0; r < K; ++r) {
      int* key = keys + (p * K + r) * (D + 1);
      common::lattice_vertex_key<D>(s, r, key);
      key[D] = static_cast<int>(b);
      w[p * K + r] = s.weight[r];
    }
  }
}

// Inserts every entry's key; slot[i] = its slot. Afterwards table[slot] = the smallest entry with
// that key. Keys are unique per slot: a key's first claim is at the first empty slot of its probe
// sequence, and a lost CAS returns the winner, whose key is compared.
template <int D>
__global__ void insert_kernel(const int* __restrict__ keys, int64_t n, int* table, uint32_t mask,
                              int* __restrict__ slot) {
  FASTSEG_GRID_STRIDE(i, n) {
    const int* key = keys + i * (D + 1);
    uint32_t s = common::lattice_hash<D + 1>(key) & mask;
    while (true) {
      const int old = atomicCAS(table + s, kEmpty, static_cast<int>(i));
      if (old == kEmpty) break;
      if (common::lattice_key_equal<D + 1>(keys + int64_t(old) * (D + 1), key)) {
        atomicMin(table + s, static_cast<int>(i));
        break;
      }
      s = (s + 1) & mask;
    }
    slot[i] = static_cast<int>(s);
  }
}

// first[i] = 1 if entry i is the smallest entry of its key (a vertex), else 0.
__global__ void first_kernel(const int* __restrict__ table, const int* __restrict__ slot,
                             int64_t n, int* __restrict__ first) {
  FASTSEG_GRID_STRIDE(i, n) first[i] = table[slot[i]] == i ? 1 : 0;
}

// vertex[i] = the vertex of entry i (csum: inclusive scan of first); rep[v] = v's smallest entry.
__global__ void vertex_kernel(const int* __restrict__ table, const int* __restrict__ slot,
                              const int* __restrict__ csum, int64_t n, int* __restrict__ vertex,
                              int* __restrict__ rep) {
  FASTSEG_GRID_STRIDE(i, n) {
    const int e = table[slot[i]];
    const int v = csum[e] - 1;
    vertex[i] = v;
    if (e == i) rep[v] = static_cast<int>(i);
  }
}

// The vertex with this key (D coordinates, image), or -1.
template <int D>
__device__ int find_vertex(const int* __restrict__ table, uint32_t mask,
                           const int* __restrict__ keys, const int* __restrict__ csum,
                           const int* key) {
  for (uint32_t s = common::lattice_hash<D + 1>(key) & mask;; s = (s + 1) & mask) {
    const int e = table[s];
    if (e == kEmpty) return -1;
    if (common::lattice_key_equal<D + 1>(keys + int64_t(e) * (D + 1), key)) return csum[e] - 1;
  }
}

// nbr[(2 j + 0) M + v] = v - e_j, nbr[(2 j + 1) M + v] = v + e_j (-1: not in v's image's
// lattice).
template <int D>
__global__ void neighbour_kernel(const int* __restrict__ table, uint32_t mask,
                                 const int* __restrict__ keys, const int* __restrict__ csum,
                                 const int* __restrict__ rep, int64_t M, int* __restrict__ nbr) {
  FASTSEG_GRID_STRIDE(v, M) {
    int key[D + 1];
#pragma unroll
    for (int i = 0; i <= D; ++i) key[i] = keys[int64_t(rep[v]) * (D + 1) + i];
#pragma unroll
    for (int j = 0; j <= D; ++j)
#pragma unroll
      for (int side = 0; side < 2; ++side) {
        int nk[D + 1];
        common::lattice_neighbour_key<D>(key, j, side == 0 ? -1 : 1, nk);
        nk[D] = key[D];
        nbr[(2 * j + side) * M + v] = find_vertex<D>(table, mask, keys, csum, nk);
      }
  }
}

// CSR by vertex from the entries sorted (stably) by vertex: start [M + 1], pixel and splat_w of
// each CSR position.
__global__ void csr_kernel(const int* __restrict__ sorted_vertex,
                           const int64_t* __restrict__ sorted_entry, const float* __restrict__ w,
                           int K, int64_t n, int64_t M, int* __restrict__ start,
                           int* __restrict__ pixel, float* __restrict__ splat_w) {
  FASTSEG_GRID_STRIDE(q, n) {
    const int v = sorted_vertex[q];
    if (q == 0 || sorted_vertex[q - 1] != v) start[v] = static_cast<int>(q);
    if (q == n - 1) start[M] = static_cast<int>(n);
    const int64_t e = sorted_entry[q];
    pixel[q] = static_cast<int>(e / K);
    splat_w[q] = w[e];
  }
}

// ---- filtering ---------------------------------------------------------------------------------

// out[v, c] = sum over v's CSR entries (pixel order) of splat_w * in[pixel, c].
__global__ void splat_kernel(const int* __restrict__ start, const int* __restrict__ pixel,
                             const float* __restrict__ splat_w, const float* __restrict__ in,
                             int64_t C, int64_t M, float* __restrict__ out) {
  FASTSEG_GRID_STRIDE(i, M * C) {
    const int64_t v = i / C, c = i - v * C;
    float acc = 0.f;
    for (int q = start[v]; q < start[v + 1]; ++q) acc += splat_w[q] * in[pixel[q] * C + c];
    out[i] = acc;
  }
}

// out[v, c] = in[v, c] + (in[prev[v], c] + in[next[v], c]) / 2, absent neighbours counting 0.
__global__ void blur_kernel(const int* __restrict__ prev, const int* __restrict__ next,
                            const float* __restrict__ in, int64_t C, int64_t M,
                            float* __restrict__ out) {
  FASTSEG_GRID_STRIDE(i, M * C) {
    const int64_t v = i / C, c = i - v * C;
    const int a = prev[v], b = next[v];
    const float before = a >= 0 ? in[a * C + c] : 0.f;
    const float after = b >= 0 ? in[b * C + c] : 0.f;
    out[i] = in[i] + 0.5f * (before + after);
  }
}

// From the filtered ones vector V: norm = (slice of V)^-1/2; slice_w *= norm compat.
__global__ void normalise_kernel(const int* __restrict__ vertex, const float* __restrict__ V,
                                 int K, int64_t P, float compat, float* __restrict__ slice_w,
                                 float* __restrict__ norm) {
  FASTSEG_GRID_STRIDE(p, P) {
    float d = 0.f;
    for (int r = 0; r < K; ++r) d += slice_w[p * K + r] * V[vertex[p * K + r]];
    const float n = 1.f / sqrtf(d + 1e-20f);
    norm[p] = n;
    for (int r = 0; r < K; ++r) slice_w[p * K + r] *= n * compat;
  }
}

__global__ void scale_splat_kernel(const int* __restrict__ pixel, const float* __restrict__ norm,
                                   int64_t n, float* __restrict__ splat_w) {
  FASTSEG_GRID_STRIDE(q, n) splat_w[q] *= norm[pixel[q]];
}

// ---- slice + softmax ---------------------------------------------------------------------------

struct LatticeView {
  const int* vertex;     // [P, K]
  const float* slice_w;  // [P, K]
  const float* values;   // [M, C], the last filter's result
  int K;
};

// Slice of a and b at (p, c), summed in the CPU's order.
__device__ __forceinline__ float slice_at(const LatticeView& a, const LatticeView& b, int64_t p,
                                          int64_t c, int64_t C) {
  float acc = 0.f;
  for (int r = 0; r < a.K; ++r)
    acc += a.slice_w[p * a.K + r] * a.values[a.vertex[p * a.K + r] * C + c];
  for (int r = 0; r < b.K; ++r)
    acc += b.slice_w[p * b.K + r] * b.values[b.vertex[p * b.K + r] * C + c];
  return acc;
}

// Reduction over an aligned group of G (a power of two <= 32) lanes; every lane of the warp
// must call it.
template <bool kMax>
__device__ __forceinline__ float group_reduce(float v, int G) {
  for (int o = G / 2; o > 0; o /= 2) {
    const float u = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, u) : v + u;
  }
  return v;
}

// A group of G lanes per pixel p, lane l handling labels l, l + G, ...; m = the message (the
// slices of a and b) when `message`, else 0 (forward) or io itself (backward).
// Forward:  io[p] = softmax(m - U[p]) (ref = U).
// Backward: with q = ref[p] (the Q_t whose input this is) and g = m (dL/dQ_t):
//           io[p] = dL/da = q (g - <q, g>), dU[p] -= io[p].
template <bool kBackward>
__global__ void __launch_bounds__(kThreads)
    slice_kernel(LatticeView a, LatticeView b, bool message, const float* __restrict__ ref,
                 float* __restrict__ io, float* __restrict__ dU, int64_t P, int64_t C, int G) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t p = t / G;
  // Lanes past the last pixel do no work but still take part in the shuffles.
  const int64_t c0 = p < P ? t % G : C;
  const int64_t row = p * C;
  float acc = kBackward ? 0.f : -INFINITY;  // <q, g> or max_c
  for (int64_t c = c0; c < C; c += G) {
    const float m = message ? slice_at(a, b, p, c, C) : (kBackward ? io[row + c] : 0.f);
    if constexpr (kBackward) {
      io[row + c] = m;
      acc += ref[row + c] * m;
    } else {
      const float x = m - ref[row + c];
      io[row + c] = x;
      acc = fmaxf(acc, x);
    }
  }
  acc = group_reduce<!kBackward>(acc, G);
  if constexpr (kBackward) {
    for (int64_t c = c0; c < C; c += G) {
      const float ga = ref[row + c] * (io[row + c] - acc);
      io[row + c] = ga;
      dU[row + c] -= ga;
    }
  } else {
    float sum = 0.f;
    for (int64_t c = c0; c < C; c += G) {
      const float e = expf(io[row + c] - acc);
      io[row + c] = e;
      sum += e;
    }
    const float inv = 1.f / group_reduce<false>(sum, G);
    for (int64_t c = c0; c < C; c += G) io[row + c] *= inv;
  }
}

// ---- host side ---------------------------------------------------------------------------------

struct Lattice {
  int K = 0;
  int64_t M = 0;
  at::Tensor vertex;   // int32 [P, K]
  at::Tensor slice_w;  // float [P, K]: w norm compat
  at::Tensor start;    // int32 [M + 1]: CSR by vertex
  at::Tensor pixel;    // int32 [P K]: pixel of each CSR position
  at::Tensor splat_w;  // float [P K]: w norm of each CSR position
  at::Tensor nbr;      // int32 [K, 2, M]: v - e_j, v + e_j
  at::Tensor va, vb;   // float [M, C]: ping-pong lattice values
  const float* values = nullptr;  // va or vb: the last filter's result

  LatticeView view() const {
    return {vertex.const_data_ptr<int>(), slice_w.const_data_ptr<float>(), values, K};
  }

  // Splat `in` [P, C], then blur along e_0..e_D (or e_D..e_0 for the adjoint).
  void filter(const float* in, int64_t C, bool adjoint, cudaStream_t stream) {
    float* cur = va.mutable_data_ptr<float>();
    float* other = vb.mutable_data_ptr<float>();
    const unsigned blocks = blocks_for(M * C);
    splat_kernel<<<blocks, kThreads, 0, stream>>>(start.const_data_ptr<int>(),
                                                  pixel.const_data_ptr<int>(),
                                                  splat_w.const_data_ptr<float>(), in, C, M, cur);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int* n = nbr.const_data_ptr<int>();
    for (int step = 0; step < K; ++step) {
      const int j = adjoint ? K - 1 - step : step;
      blur_kernel<<<blocks, kThreads, 0, stream>>>(n + 2 * j * M, n + (2 * j + 1) * M, cur, C, M,
                                                   other);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      std::swap(cur, other);
    }
    values = cur;
  }
};

// The normalised lattices of N images' kernel, side by side (vertices numbered image after
// image); image [N, 3, H W] (read for D = 5 only).
template <int D>
Lattice build_lattice(const float* image, int64_t N, int64_t H, int64_t W, float sxy, float srgb,
                      float compat, int64_t C, const at::TensorOptions& fopts,
                      cudaStream_t stream) {
  constexpr int K = D + 1;
  const int64_t P = N * H * W, n = P * K;
  const auto iopts = fopts.dtype(at::kInt);
  Lattice L;
  L.K = K;

  Scale<D> scale;
  for (int i = 0; i < D; ++i) scale.v[i] = common::lattice_axis_scale(D, i);
  auto keys = at::empty({n * (D + 1)}, iopts);
  L.slice_w = at::empty({n}, fopts);
  simplex_kernel<D><<<blocks_for(P), kThreads, 0, stream>>>(
      image, P, H * W, W, sxy, srgb, scale, keys.mutable_data_ptr<int>(),
      L.slice_w.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t capacity = 1024;
  while (capacity < 2 * n) capacity *= 2;  // <= 2^31 (a chunk <= kMaxPixels): slots fit an int
  const auto mask = static_cast<uint32_t>(capacity - 1);
  auto table = at::full({capacity}, kEmpty, iopts);
  auto slot = at::empty({n}, iopts);
  insert_kernel<D><<<blocks_for(n), kThreads, 0, stream>>>(
      keys.const_data_ptr<int>(), n, table.mutable_data_ptr<int>(), mask,
      slot.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto first = at::empty({n}, iopts);
  first_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      table.const_data_ptr<int>(), slot.const_data_ptr<int>(), n, first.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto csum = at::cumsum(first, 0, at::kInt);
  const int64_t M = csum[n - 1].item<int32_t>();  // host sync: sizes the vertex buffers
  L.M = M;
  L.vertex = at::empty({n}, iopts);
  auto rep = at::empty({M}, iopts);
  vertex_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      table.const_data_ptr<int>(), slot.const_data_ptr<int>(), csum.const_data_ptr<int>(), n,
      L.vertex.mutable_data_ptr<int>(), rep.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  L.nbr = at::empty({2 * K * M}, iopts);
  neighbour_kernel<D><<<blocks_for(M), kThreads, 0, stream>>>(
      table.const_data_ptr<int>(), mask, keys.const_data_ptr<int>(), csum.const_data_ptr<int>(),
      rep.const_data_ptr<int>(), M, L.nbr.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto [sorted_vertex, sorted_entry] =
      at::sort(L.vertex, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  L.start = at::empty({M + 1}, iopts);
  L.pixel = at::empty({n}, iopts);
  L.splat_w = at::empty({n}, fopts);
  csr_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      sorted_vertex.const_data_ptr<int>(), sorted_entry.const_data_ptr<int64_t>(),
      L.slice_w.const_data_ptr<float>(), K, n, M, L.start.mutable_data_ptr<int>(),
      L.pixel.mutable_data_ptr<int>(), L.splat_w.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Symmetric normalisation with the raw weights, then folded into them.
  L.va = at::empty({M * C}, fopts);
  L.vb = at::empty({M * C}, fopts);
  const auto ones = at::ones({P}, fopts);
  L.filter(ones.const_data_ptr<float>(), 1, /*adjoint=*/false, stream);
  auto norm = at::empty({P}, fopts);
  normalise_kernel<<<blocks_for(P), kThreads, 0, stream>>>(
      L.vertex.const_data_ptr<int>(), L.values, K, P, compat, L.slice_w.mutable_data_ptr<float>(),
      norm.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scale_splat_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
      L.pixel.const_data_ptr<int>(), norm.const_data_ptr<float>(), n,
      L.splat_w.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return L;
}

// Mean field on N images at once; rows are [N H W, C].
class CrfBatch {
 public:
  // image [N, 3, H W]; the lattices are only built when there is a message to pass.
  CrfBatch(const float* image, int64_t N, int64_t H, int64_t W, int64_t C, const Params& prm,
           const at::TensorOptions& fopts, cudaStream_t stream)
      : P_(N * H * W), C_(C), stream_(stream) {
    G_ = 1;
    while (G_ < C && G_ < 32) G_ *= 2;
    if (prm.iterations == 0) return;
    pos_ = build_lattice<2>(nullptr, N, H, W, prm.pos_sxy, 1.f, prm.pos_compat, C, fopts,
                            stream);
    bi_ = build_lattice<5>(image, N, H, W, prm.bi_sxy, prm.bi_srgb, prm.bi_compat, C, fopts,
                           stream);
  }

  // Q_0 = softmax(-U), Q_t = softmax(-U + M Q_{t-1}); Q(t) is Q_t's buffer (may repeat).
  template <typename QBuf>
  void forward(const float* U, int64_t T, const QBuf& Q) {
    slice<false>(/*message=*/false, U, Q(0), nullptr);
    for (int64_t t = 1; t <= T; ++t) {
      message(Q(t - 1), /*adjoint=*/false);
      slice<false>(/*message=*/true, U, Q(t), nullptr);
    }
  }

  // dU (zeroed) from g = dL/dQ_T (overwritten) and the trajectory Q(0..T).
  template <typename QBuf>
  void backward(float* g, int64_t T, const QBuf& Q, float* dU) {
    slice<true>(/*message=*/false, Q(T), g, dU);
    for (int64_t t = T; t >= 1; --t) {  // g = dL/da_t; dL/dQ_{t-1} = M^T g
      message(g, /*adjoint=*/true);
      slice<true>(/*message=*/true, Q(t - 1), g, dU);
    }
  }

 private:
  void message(const float* in, bool adjoint) {
    pos_.filter(in, C_, adjoint, stream_);
    bi_.filter(in, C_, adjoint, stream_);
  }

  template <bool kBackward>
  void slice(bool message, const float* ref, float* io, float* dU) {
    const int64_t threads = P_ * G_;
    const auto blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
    const LatticeView none{nullptr, nullptr, nullptr, 0};
    slice_kernel<kBackward><<<blocks, kThreads, 0, stream_>>>(
        message ? pos_.view() : none, message ? bi_.view() : none, message, ref, io, dU, P_, C_,
        G_);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  int64_t P_, C_;
  int G_;
  cudaStream_t stream_;
  Lattice pos_, bi_;
};

// ---- ops ---------------------------------------------------------------------------------------

// The device, the hash table's size limit and the lattice range (syncs once for the image's
// maximum).
void check_cuda_inputs(const at::Tensor& unary, const at::Tensor& image, const Params& prm,
                       const char* op) {
  TORCH_CHECK(unary.is_cuda(), "unary must be a CUDA tensor for the cuda kernel of ", op,
              ", got ", unary.device());
  const int64_t H = unary.size(2), W = unary.size(3);
  // Batches are cut into chunks of whole images; one image must fit a chunk.
  TORCH_CHECK(H * W <= kMaxPixels, "image of ", H, " x ", W,
              " pixels is too large for the cuda kernel of ", op);
  dense_crf_lattice_check(image, prm.pos_sxy, prm.bi_sxy, prm.bi_srgb);
}

// [N, C, H, W] planes -> [N H W, C] rows (a fresh buffer).
at::Tensor to_rows(const at::Tensor& planes) {
  const int64_t C = planes.size(1);
  return planes.permute({0, 2, 3, 1}).clone(at::MemoryFormat::Contiguous).view({-1, C});
}

// Images per chunk: up to kChunkPixels pixels, or a single image (<= kMaxPixels, checked).
int64_t chunk_images(int64_t N, int64_t P) { return std::clamp<int64_t>(kChunkPixels / P, 1, N); }

at::Tensor dense_crf_cuda(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                          double pos_sxy, double pos_compat, double bi_sxy, double bi_srgb,
                          double bi_compat) {
  dense_crf_check(unary, image, iterations, pos_sxy, bi_sxy, bi_srgb);
  const Params prm = dense_crf_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat);
  check_cuda_inputs(unary, image, prm, "dense_crf");
  c10::cuda::CUDAGuard device_guard(unary.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto q = at::empty(unary.sizes(), unary.options());
  if (q.numel() == 0) return q;
  const int64_t N = unary.size(0), C = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t P = H * W, chunk = chunk_images(N, P);
  const auto img = image.contiguous();
  const auto fopts = unary.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto u = to_rows(unary);
  auto a = at::empty({N * P, C}, fopts);  // Q_T of every image
  auto b = iterations > 0 ? at::empty({chunk * P, C}, fopts) : a;  // one chunk's other half
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0);
    CrfBatch crf(img.const_data_ptr<float>() + n0 * 3 * P, nc, H, W, C, prm, fopts, stream);
    float* qa = a.mutable_data_ptr<float>() + n0 * P * C;
    float* qb = b.mutable_data_ptr<float>();
    // Ping-pong so that Q_T lands in a.
    crf.forward(u.const_data_ptr<float>() + n0 * P * C, iterations,
                [&](int64_t t) { return (iterations - t) % 2 == 0 ? qa : qb; });
  }
  q.copy_(a.view({N, H, W, C}).permute({0, 3, 1, 2}));
  return q;
}

at::Tensor dense_crf_backward_cuda(const at::Tensor& grad, const at::Tensor& unary,
                                   const at::Tensor& image, int64_t iterations, double pos_sxy,
                                   double pos_compat, double bi_sxy, double bi_srgb,
                                   double bi_compat) {
  dense_crf_backward_check(grad, unary, image, iterations, pos_sxy, bi_sxy, bi_srgb);
  const Params prm = dense_crf_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat);
  check_cuda_inputs(unary, image, prm, "_dense_crf_backward");
  c10::cuda::CUDAGuard device_guard(unary.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  auto du = at::empty(unary.sizes(), unary.options());
  if (du.numel() == 0) return du;
  const int64_t N = unary.size(0), C = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t P = H * W, chunk = chunk_images(N, P);
  const auto img = image.contiguous();
  const auto fopts = unary.options();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto u = to_rows(unary);
  auto g = to_rows(grad);  // a copy: overwritten
  auto d = at::zeros({N * P, C}, fopts);
  auto traj = at::empty({iterations + 1, chunk * P, C}, fopts);
  float* traj_p = traj.mutable_data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nc = std::min(chunk, N - n0), off = n0 * P * C;
    CrfBatch crf(img.const_data_ptr<float>() + n0 * 3 * P, nc, H, W, C, prm, fopts, stream);
    const auto Q = [&](int64_t t) { return traj_p + t * nc * P * C; };
    crf.forward(u.const_data_ptr<float>() + off, iterations, Q);
    crf.backward(g.mutable_data_ptr<float>() + off, iterations, Q,
                 d.mutable_data_ptr<float>() + off);
  }
  du.copy_(d.view({N, H, W, C}).permute({0, 3, 1, 2}));
  return du;
}

#undef FASTSEG_GRID_STRIDE

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CUDA, m) {
  m.impl("dense_crf", &dense_crf_cuda);
  m.impl("_dense_crf_backward", &dense_crf_backward_cuda);
}

}  // namespace fastseg::ops
