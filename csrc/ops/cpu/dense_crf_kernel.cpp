// CPU kernels of fastseg::dense_crf and fastseg::_dense_crf_backward.
//
// Per image and kernel (the Gaussian on (x, y) / pos_sxy, D = 2; the bilateral on
// ((x, y) / bi_sxy, rgb / bi_srgb), D = 5) a permutohedral lattice (ops/common/permutohedral.h)
// is built once and reused by every iteration and every label:
//   - vertex, slice_w [P, D+1]: each pixel's D+1 simplex vertices and barycentric weights;
//   - the same incidence transposed (CSR by vertex: start [M+1], pixel, splat_w [P (D+1)]), so
//     that the splat is a conflict-free gather per vertex, parallel and deterministic;
//   - blur chains: for each lattice direction e_j, the maximal runs v, v + e_j, v + 2 e_j, ... of
//     existing vertices. The [1/2, 1, 1/2] blur along e_j is then an in-place sweep along each
//     chain (carrying the previous vertex's old value), and vertices without a neighbour along
//     e_j are not touched at all.
// Vertices are numbered in order of first appearance (raster order), which keeps the gathers
// local. Keys are hashed into an open-addressing table that is dropped once the chains are
// known; only v - e_j is looked up (v + e_j follows by inverting that map).
//
// Values live in pixel-major rows [P, S] (all labels at once, S = C for C >= 8) and lattice
// values in [M, S]; splat, blur and slice are loops over rows of compile-time width. The
// symmetric normalisation D^-1/2 (D = the lattice's own filtering of a ones vector) and the Potts
// compatibility are folded into the weights once: splat_w = w * norm[pixel],
// slice_w = w * norm[pixel] * compat. One mean-field step is then splat -> D+1 blur sweeps for
// each kernel, and one loop over pixels that slices both kernels, subtracts U and takes the
// softmax.
//
// The lattice filter is K = S^T B_D ... B_0 S (S: splat, B_j: blur along e_j, each symmetric), so
// its exact adjoint blurs the directions in reverse order; the backward does that.
//
// Parallelism: over images when N > 1; inside an image over vertices (splat, neighbour lookups),
// chains (blur), directions (chain walks) and pixels (simplex, slice + softmax). The hash-table
// insertion and the CSR fill are sequential. Results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/common/macros.h"
#include "ops/common/permutohedral.h"
#include "ops/dense_crf.h"

namespace fastseg::ops {
namespace {
constexpr int64_t kPixelGrain = 1024;
constexpr int64_t kVertexGrain = 1024;

using Params = DenseCrfParams;

// ---- storage -----------------------------------------------------------------------------------

// n uninitialised elements of a trivial type. Blocks of 2 MiB and more are 2 MiB-aligned and
// advised to use transparent huge pages: the buffers here are large, freshly allocated on every
// call and accessed at random, where 4 KiB pages cost a page fault per page and TLB misses.
template <typename T>
class Buffer {
  static_assert(std::is_trivially_copyable_v<T>);

 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { reset(n); }
  Buffer(int64_t n, T value) {
    reset(n);
    std::fill(p_, p_ + n, value);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  Buffer& operator=(Buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~Buffer() { std::free(p_); }

  // n elements; the contents are undefined after a change of size.
  void reset(int64_t n) {
    if (n == n_) return;
    std::free(p_);
    p_ = nullptr;
    n_ = 0;
    if (n <= 0) return;
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    constexpr size_t kHuge = size_t(2) << 20;
    if (bytes >= kHuge) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      p_ = static_cast<T*>(std::aligned_alloc(kHuge, rounded));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (p_ != nullptr) madvise(p_, rounded, MADV_HUGEPAGE);
#endif
    } else {
      p_ = static_cast<T*>(std::malloc(bytes));
    }
    TORCH_CHECK(p_ != nullptr, "dense_crf: out of memory (", bytes, " bytes)");
    n_ = n;
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  T& operator[](int64_t i) { return p_[i]; }
  const T& operator[](int64_t i) const { return p_[i]; }
  int64_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  int64_t n_ = 0;
};

inline void prefetch(const void* p) { __builtin_prefetch(p); }

// ---- hash table of lattice keys ----------------------------------------------------------------

// Open-addressing hash table of lattice keys (linear probing, load <= 1/2). A slot holds the key
// and its vertex index inline, so a lookup costs one cache miss; callers prefetch slots ahead.
template <int D>
class KeyTable {
  static constexpr int S = D + 1;  // ints per slot: key[D], index (-1: empty)

 public:
  explicit KeyTable(int64_t expected) {
    int64_t cap = 1024;
    while (cap < 2 * expected) cap *= 2;
    resize(cap);
  }

  void prefetch_slot(uint32_t hash) const { prefetch(slots_.data() + (hash & mask_) * S); }

  // Index of key (inserted with the next index if new).
  int32_t insert(const int* key, uint32_t hash) {
    if (2 * (static_cast<int64_t>(size_) + 1) > capacity()) grow();
    for (uint64_t i = hash & mask_;; i = (i + 1) & mask_) {
      int32_t* s = slots_.data() + i * S;
      if (s[D] < 0) {
        for (int k = 0; k < D; ++k) s[k] = key[k];
        s[D] = size_;
        keys_.insert(keys_.end(), key, key + D);
        return size_++;
      }
      if (common::lattice_key_equal<D>(s, key)) return s[D];
    }
  }

  // Index of key, or -1.
  int32_t find(const int* key, uint32_t hash) const {
    for (uint64_t i = hash & mask_;; i = (i + 1) & mask_) {
      const int32_t* s = slots_.data() + i * S;
      if (s[D] < 0 || common::lattice_key_equal<D>(s, key)) return s[D];
    }
  }

  int32_t size() const { return size_; }
  const int* key_of(int64_t index) const { return keys_.data() + index * D; }

 private:
  int64_t capacity() const { return static_cast<int64_t>(mask_) + 1; }

  void resize(int64_t cap) {
    slots_.reset(cap * S);
    for (int64_t i = 0; i < cap; ++i) slots_[i * S + D] = -1;
    mask_ = static_cast<uint64_t>(cap - 1);
  }

  void grow() {
    resize(2 * capacity());
    for (int32_t v = 0; v < size_; ++v) {
      const int* key = key_of(v);
      uint64_t i = common::lattice_hash<D>(key) & mask_;
      while (slots_[i * S + D] >= 0) i = (i + 1) & mask_;
      for (int k = 0; k < D; ++k) slots_[i * S + k] = key[k];
      slots_[i * S + D] = v;
    }
  }

  Buffer<int32_t> slots_;      // [capacity, D + 1]
  std::vector<int32_t> keys_;  // [size, D]: key of each vertex
  uint64_t mask_ = 0;
  int32_t size_ = 0;
};

// ---- the lattice of one image and kernel -------------------------------------------------------

struct Lattice {
  int K = 0;                 // vertices per simplex (D + 1)
  int64_t P = 0, M = 0;      // pixels, lattice vertices
  Buffer<int32_t> vertex;    // [P, K]
  Buffer<float> slice_w;     // [P, K] barycentric weight (x norm x compat once normalised)
  Buffer<int32_t> start;     // [M + 1] CSR by vertex
  Buffer<int32_t> pixel;     // [P K] pixel of each CSR entry
  Buffer<float> splat_w;     // [P K] barycentric weight (x norm once normalised)
  // Chains [chain_dir[j], chain_dir[j + 1]) run along direction j; chain c is
  // chain_node[chain_off[c] .. chain_off[c + 1]).
  Buffer<int32_t> chain_node;
  Buffer<int64_t> chain_off;
  std::vector<int64_t> chain_dir;
};

// Simplex, barycentric weights, vertex keys and their hashes of the points [p0, p1).
template <int D>
FASTSEG_CPU_CLONES void simplex_rows(const float* __restrict__ feats, const float* scale,
                                     int64_t p0, int64_t p1, int* __restrict__ keys,
                                     uint32_t* __restrict__ hashes, float* __restrict__ weights) {
  constexpr int K = D + 1;
  for (int64_t p = p0; p < p1; ++p) {
    common::LatticeSimplex<D> s;
    common::lattice_simplex<D>(feats + p * D, scale, s);
    for (int r = 0; r < K; ++r) {
      int* key = keys + (p * K + r) * D;
      common::lattice_vertex_key<D>(s, r, key);
      hashes[p * K + r] = common::lattice_hash<D>(key);
      weights[p * K + r] = s.weight[r];
    }
  }
}

// The lattice of the points feats [P, D].
template <int D>
Lattice build_lattice(const float* feats, int64_t P) {
  constexpr int K = D + 1;
  const int64_t PK = P * K;
  Lattice L;
  L.K = K;
  L.P = P;
  float scale[D];
  for (int i = 0; i < D; ++i) scale[i] = common::lattice_axis_scale(D, i);

  // Simplex, weights, vertex keys and hashes of every pixel (parallel).
  Buffer<int> keys(PK * D);
  Buffer<uint32_t> hashes(PK);
  L.slice_w.reset(PK);
  at::parallel_for(0, P, kPixelGrain, [&](int64_t begin, int64_t end) {
    simplex_rows<D>(feats, scale, begin, end, keys.data(), hashes.data(), L.slice_w.data());
  });

  // Vertex numbering in order of first appearance (sequential; slots prefetched ahead).
  KeyTable<D> table(P);
  L.vertex.reset(PK);
  constexpr int64_t kAhead = 16;
  for (int64_t i = 0; i < PK; ++i) {
    if (i + kAhead < PK) table.prefetch_slot(hashes[i + kAhead]);
    L.vertex[i] = table.insert(keys.data() + i * D, hashes[i]);
  }
  keys.reset(0);
  hashes.reset(0);
  const int64_t M = table.size();
  L.M = M;

  // prev[j M + v]: the vertex v - e_j, or -1 (parallel lookups in the finished table, a block
  // of vertices at a time so that the slots can be prefetched).
  Buffer<int32_t> prev(K * M), next(K * M);
  at::parallel_for(0, M, kVertexGrain, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 8;
    int nk[kBlock * K][D];
    uint32_t nh[kBlock * K];
    for (int j = 0; j < K; ++j)
      std::fill(next.data() + j * M + begin, next.data() + j * M + end, -1);
    for (int64_t v0 = begin; v0 < end; v0 += kBlock) {
      const int64_t n = std::min(kBlock, end - v0);
      for (int64_t b = 0; b < n; ++b) {
        const int* key = table.key_of(v0 + b);
        for (int j = 0; j < K; ++j) {
          common::lattice_neighbour_key<D>(key, j, -1, nk[b * K + j]);
          nh[b * K + j] = common::lattice_hash<D>(nk[b * K + j]);
          table.prefetch_slot(nh[b * K + j]);
        }
      }
      for (int64_t b = 0; b < n; ++b)
        for (int j = 0; j < K; ++j) prev[j * M + v0 + b] = table.find(nk[b * K + j], nh[b * K + j]);
    }
  });
  // next = prev inverted (v - e_j has the single + neighbour v, so the writes never collide).
  at::parallel_for(0, M, kVertexGrain, [&](int64_t begin, int64_t end) {
    for (int j = 0; j < K; ++j)
      for (int64_t v = begin; v < end; ++v)
        if (prev[j * M + v] >= 0) next[j * M + prev[j * M + v]] = static_cast<int32_t>(v);
  });

  // Chains of length >= 2, walked from their heads (no v - e_j), one direction per task.
  std::vector<std::vector<int32_t>> nodes(K);
  std::vector<std::vector<int64_t>> ends(K);
  at::parallel_for(0, K, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t* pj = prev.data() + j * M;
      const int32_t* nj = next.data() + j * M;
      for (int64_t v = 0; v < M; ++v) {
        if (pj[v] >= 0 || nj[v] < 0) continue;
        for (int32_t u = static_cast<int32_t>(v); u >= 0; u = nj[u]) nodes[j].push_back(u);
        ends[j].push_back(static_cast<int64_t>(nodes[j].size()));
      }
    }
  });
  int64_t total_nodes = 0, total_chains = 0;
  for (int j = 0; j < K; ++j) {
    total_nodes += static_cast<int64_t>(nodes[j].size());
    total_chains += static_cast<int64_t>(ends[j].size());
  }
  L.chain_node.reset(total_nodes);
  L.chain_off.reset(total_chains + 1);
  L.chain_off[0] = 0;
  L.chain_dir.assign(1, 0);
  for (int64_t j = 0, node_base = 0; j < K; ++j) {
    std::copy(nodes[j].begin(), nodes[j].end(), L.chain_node.data() + node_base);
    const int64_t c0 = L.chain_dir[j];
    for (size_t c = 0; c < ends[j].size(); ++c) L.chain_off[c0 + 1 + c] = node_base + ends[j][c];
    L.chain_dir.push_back(c0 + static_cast<int64_t>(ends[j].size()));
    node_base += static_cast<int64_t>(nodes[j].size());
  }

  // The incidence transposed: CSR by vertex with the entries in pixel order (a counting sort;
  // sequential: a parallel fill would write neighbouring entries from different threads).
  L.start.reset(M + 1);
  std::fill(L.start.data(), L.start.data() + M + 1, 0);
  for (int64_t i = 0; i < PK; ++i) ++L.start[L.vertex[i] + 1];
  for (int64_t v = 0; v < M; ++v) L.start[v + 1] += L.start[v];
  L.pixel.reset(PK);
  L.splat_w.reset(PK);
  {
    Buffer<int32_t> fill(M);
    std::copy(L.start.data(), L.start.data() + M, fill.data());
    for (int64_t i = 0; i < PK; ++i) {
      const int32_t e = fill[L.vertex[i]]++;
      L.pixel[e] = static_cast<int32_t>(i / K);
      L.splat_w[e] = L.slice_w[i];
    }
  }
  return L;
}

// ---- vectorised loops --------------------------------------------------------------------------
//
// A row of labels is processed as N chunks of L lanes (GCC vector extensions: one vector
// instruction per chunk in every clone, where plain loops over a runtime C vectorise badly). A
// call covers `lanes` consecutive lanes of each row (lanes <= N * L); chunk n starts at lane
// min(n L, lanes - L), so for lanes not a multiple of L the last chunk overlaps the one before it
// and recomputes a few lanes to the same values. Rows therefore need no padding beyond 8 lanes:
// the row stride is C for C >= 8 (4 or 8 below), and C > 32 labels are processed 32 lanes at a
// time.

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));

template <int W>  // W: the compiled width, 1, 2, 4 or a multiple of 8 up to 32
struct Row {
  static_assert(W % 8 == 0 && W <= 32, "row widths are 1, 2, 4, 8, 16, 24 or 32");
  using T = f32x8;
  static constexpr int N = W / 8;
};
template <>
struct Row<4> {
  using T = f32x4;
  static constexpr int N = 1;
};
template <>
struct Row<2> {
  using T = float;
  static constexpr int N = 2;
};
template <>
struct Row<1> {
  using T = float;
  static constexpr int N = 1;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // the 32-byte chunks only live in inlined code
#endif

template <typename T>
inline T load(const float* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
inline void store(float* p, const T& v) {
  __builtin_memcpy(p, &v, sizeof(T));
}
// The unsigned integer (chunk) type of a float (chunk)'s bits.
template <typename T>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<f32x4> {
  using type = u32x4;
};
template <>
struct BitsOf<f32x8> {
  using type = u32x8;
};
inline float lane(float v, int) { return v; }
template <typename T>
inline float lane(const T& v, int l) { return v[l]; }
inline void set_lane(float& v, int, float x) { v = x; }
template <typename T>
inline void set_lane(T& v, int l, float x) { v[l] = x; }

// Per lane: a < b ? if_less : otherwise (a NaN compares false). For chunks this is a bitwise blend
// on the comparison mask, which GCC and Clang both accept.
inline float blend_less(float a, float b, float if_less, float otherwise) {
  return a < b ? if_less : otherwise;
}
template <typename T>
inline T blend_less(const T& a, const T& b, const T& if_less, const T& otherwise) {
  using I = typename BitsOf<T>::type;
  const I mask = (I)(a < b);  // all ones / zero per lane
  I x, y;
  __builtin_memcpy(&x, &if_less, sizeof(T));
  __builtin_memcpy(&y, &otherwise, sizeof(T));
  const auto bits = (x & mask) | (y & ~mask);
  T out;
  __builtin_memcpy(&out, &bits, sizeof(T));
  return out;
}

// First lane of each chunk of a call covering `lanes` lanes.
template <int W>
struct ChunkOffsets {
  static constexpr int N = Row<W>::N;
  static constexpr int L = sizeof(typename Row<W>::T) / sizeof(float);
  int64_t o[N];
  explicit ChunkOffsets(int64_t lanes) {
    for (int n = 0; n < N; ++n) o[n] = std::min<int64_t>(n * L, lanes - L);
  }
};

inline void prefetch_row(const float* row, int64_t lanes) {
  for (int64_t k = 0; k < lanes; k += 16) prefetch(row + k);
  prefetch(row + lanes - 1);
}

// V[v, :lanes] = sum over the CSR entries e of v of w[e] * in[pixel[e], :lanes], v in [v0, v1).
template <int W>
FASTSEG_CPU_CLONES void splat_rows(const int32_t* __restrict__ start,
                                   const int32_t* __restrict__ pixel, const float* __restrict__ w,
                                   const float* __restrict__ in, int64_t S, int64_t lanes,
                                   float* __restrict__ V, int64_t v0, int64_t v1) {
  using T = typename Row<W>::T;
  constexpr int N = Row<W>::N;
  const ChunkOffsets<W> co(lanes);
  for (int64_t v = v0; v < v1; ++v) {
    T acc[N] = {};
    for (int32_t e = start[v]; e < start[v + 1]; ++e) {
      const float we = w[e];
      const float* x = in + static_cast<int64_t>(pixel[e]) * S;
      for (int n = 0; n < N; ++n) acc[n] += we * load<T>(x + co.o[n]);
    }
    for (int n = 0; n < N; ++n) store(V + v * S + co.o[n], acc[n]);
  }
}

// In-place [1/2, 1, 1/2] blur of V[:, :lanes] along the chains [c0, c1) (each a run of
// consecutive lattice neighbours). Vertices outside every chain have no neighbour along this
// direction and keep their value. Every row is read (into registers) before it is written, so the
// overlapping chunks store equal values. Rows are prefetched kAhead nodes ahead through the flat
// node list.
template <int W>
FASTSEG_CPU_CLONES void blur_chains(const int32_t* __restrict__ node,
                                    const int64_t* __restrict__ off, int64_t c0, int64_t c1,
                                    float* V, int64_t S, int64_t lanes) {
  using T = typename Row<W>::T;
  constexpr int N = Row<W>::N;
  constexpr int64_t kAhead = 16;
  const ChunkOffsets<W> co(lanes);
  const int64_t last = off[c1];
  for (int64_t i = off[c0]; i < std::min(off[c0] + kAhead, last); ++i)
    prefetch_row(V + static_cast<int64_t>(node[i]) * S, lanes);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t b = off[c], e = off[c + 1];
    // Old values of the previous and the current vertex.
    T before[N] = {}, current[N];
    float* row = V + static_cast<int64_t>(node[b]) * S;
    for (int n = 0; n < N; ++n) current[n] = load<T>(row + co.o[n]);
    for (int64_t i = b; i + 1 < e; ++i) {
      if (i + kAhead < last) prefetch_row(V + static_cast<int64_t>(node[i + kAhead]) * S, lanes);
      float* after_row = V + static_cast<int64_t>(node[i + 1]) * S;
      T after[N];
      for (int n = 0; n < N; ++n) after[n] = load<T>(after_row + co.o[n]);
      for (int n = 0; n < N; ++n) {
        store(row + co.o[n], current[n] + 0.5f * (before[n] + after[n]));
        before[n] = current[n];
        current[n] = after[n];
      }
      row = after_row;
    }
    for (int n = 0; n < N; ++n) store(row + co.o[n], current[n] + 0.5f * before[n]);
  }
}

// acc = sum_r wa[p, r] Va[va[p, r]] + sum_r wb[p, r] Vb[vb[p, r]] (the slices of two lattices)
// for the chunks at co.
template <int W>
inline void slice_pixel(int64_t p, const int32_t* __restrict__ va, const float* __restrict__ wa,
                        int Ka, const float* __restrict__ Va, const int32_t* __restrict__ vb,
                        const float* __restrict__ wb, int Kb, const float* __restrict__ Vb,
                        int64_t S, const ChunkOffsets<W>& co, typename Row<W>::T* acc) {
  using T = typename Row<W>::T;
  constexpr int N = Row<W>::N;
  for (int n = 0; n < N; ++n) acc[n] = T{};
  for (int r = 0; r < Ka; ++r) {
    const float wr = wa[p * Ka + r];
    const float* x = Va + static_cast<int64_t>(va[p * Ka + r]) * S;
    for (int n = 0; n < N; ++n) acc[n] += wr * load<T>(x + co.o[n]);
  }
  for (int r = 0; r < Kb; ++r) {
    const float wr = wb[p * Kb + r];
    const float* x = Vb + static_cast<int64_t>(vb[p * Kb + r]) * S;
    for (int n = 0; n < N; ++n) acc[n] += wr * load<T>(x + co.o[n]);
  }
}

// out[p, :lanes] = the slices of two lattices, for p in [p0, p1).
template <int W>
FASTSEG_CPU_CLONES void slice_rows(const int32_t* __restrict__ va, const float* __restrict__ wa,
                                   int Ka, const float* __restrict__ Va,
                                   const int32_t* __restrict__ vb, const float* __restrict__ wb,
                                   int Kb, const float* __restrict__ Vb, int64_t S, int64_t lanes,
                                   float* __restrict__ out, int64_t p0, int64_t p1) {
  using T = typename Row<W>::T;
  constexpr int N = Row<W>::N;
  const ChunkOffsets<W> co(lanes);
  for (int64_t p = p0; p < p1; ++p) {
    T acc[N];
    slice_pixel<W>(p, va, wa, Ka, Va, vb, wb, Kb, Vb, S, co, acc);
    for (int n = 0; n < N; ++n) store(out + p * S + co.o[n], acc[n]);
  }
}

// exp(x) for x <= 0 (x < -87 is taken as -87, ~1.6e-38), relative error ~1e-7, for a float or a
// chunk: Cephes' expf polynomial on r = x - n ln2 times 2^n. Branch-free, so it vectorises.
template <typename T>
inline T exp_nonpositive(const T& x_in) {
  using U = typename BitsOf<T>::type;
  const T lo = T{} - 87.f;
  const T x = blend_less(x_in, lo, lo, x_in);
  // t = 1.5 2^23 + round(x log2 e): the integer n sits in the low bits of t's mantissa.
  const T t = x * 1.44269504088896341f + 12582912.f;
  const T n = t - 12582912.f;
  T r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  U bits;
  __builtin_memcpy(&bits, &t, sizeof(T));
  bits = (bits + (127u - 0x4B400000u)) << 23;  // 2^n
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(T));
  return p * scale;
}

// out[p, :S] = softmax(slices - U[p, :C]) (Ka = Kb = 0: softmax(-U[p, :C])), zero in the padding
// lanes C..S, for p in [p0, p1); rows of S <= W lanes.
template <int W>
FASTSEG_CPU_CLONES void slice_softmax_rows(
    const int32_t* __restrict__ va, const float* __restrict__ wa, int Ka,
    const float* __restrict__ Va, const int32_t* __restrict__ vb, const float* __restrict__ wb,
    int Kb, const float* __restrict__ Vb, const float* __restrict__ U, int64_t S, int64_t C,
    float* __restrict__ out, int64_t p0, int64_t p1) {
  using T = typename Row<W>::T;
  constexpr int N = Row<W>::N, L = ChunkOffsets<W>::L;
  const ChunkOffsets<W> co(S);
  // Per lane: real (a label: 1 / 0), pad (0 / -inf), once (counted in the sum: a label not
  // already covered by the chunk before).
  T real[N], pad[N], once[N];
  for (int n = 0; n < N; ++n)
    for (int l = 0; l < L; ++l) {
      const int64_t k = co.o[n] + l;
      const bool is_real = k < C, first = n == 0 || k >= co.o[n - 1] + L;
      set_lane(real[n], l, is_real ? 1.f : 0.f);
      set_lane(pad[n], l, is_real ? 0.f : -std::numeric_limits<float>::infinity());
      set_lane(once[n], l, is_real && first ? 1.f : 0.f);
    }
  for (int64_t p = p0; p < p1; ++p) {
    T a[N];
    slice_pixel<W>(p, va, wa, Ka, Va, vb, wb, Kb, Vb, S, co, a);
    for (int n = 0; n < N; ++n) a[n] = a[n] - load<T>(U + p * S + co.o[n]) + pad[n];
    T top = a[0];
    for (int n = 1; n < N; ++n) top = blend_less(top, a[n], a[n], top);
    float m = lane(top, 0);
    for (int l = 1; l < L; ++l) m = std::max(m, lane(top, l));
    T total = {};
    for (int n = 0; n < N; ++n) {
      a[n] = exp_nonpositive(a[n] - m) * real[n];
      total += a[n] * once[n];
    }
    float sum = 0.f;
    for (int l = 0; l < L; ++l) sum += lane(total, l);
    const float inv = 1.f / sum;
    for (int n = 0; n < N; ++n) store(out + p * S + co.o[n], a[n] * inv);
  }
}

// Row stride for C labels: C, except 3 -> 4 and 5..7 -> 8.
int64_t row_stride(int64_t C) { return C == 3 ? 4 : (C > 4 && C < 8 ? 8 : C); }

// The compiled width for a call covering `lanes` (<= 32) lanes.
int64_t row_width(int64_t lanes) {
  return lanes <= 2 ? lanes : (lanes <= 4 ? 4 : (lanes + 7) / 8 * 8);
}

// Runs f(std::integral_constant<int, W>{}, col, lanes) for the column blocks of a row of S lanes:
// all S lanes at once for S <= 32, else blocks of 32 lanes starting at min(32 b, S - 32).
template <typename F>
void for_column_blocks(int64_t S, const F& f) {
  const auto call = [&](int64_t col, int64_t lanes) {
    switch (row_width(lanes)) {
      case 1: f(std::integral_constant<int, 1>{}, col, lanes); break;
      case 2: f(std::integral_constant<int, 2>{}, col, lanes); break;
      case 4: f(std::integral_constant<int, 4>{}, col, lanes); break;
      case 8: f(std::integral_constant<int, 8>{}, col, lanes); break;
      case 16: f(std::integral_constant<int, 16>{}, col, lanes); break;
      case 24: f(std::integral_constant<int, 24>{}, col, lanes); break;
      case 32: f(std::integral_constant<int, 32>{}, col, lanes); break;
      default: TORCH_INTERNAL_ASSERT(false, "dense_crf: unsupported row width for ", lanes);
    }
  };
  if (S <= 32) {
    call(0, S);
    return;
  }
  for (int64_t b = 0; b * 32 < S; ++b) call(std::min<int64_t>(32 * b, S - 32), 32);
}

// x[p, :C] = softmax(x[p, :C] - U[p, :C]), x[p, C:S] = 0, for p in [p0, p1).
FASTSEG_CPU_CLONES void softmax_rows(float* __restrict__ x, const float* __restrict__ U, int64_t S,
                                     int64_t C, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    float* __restrict__ row = x + p * S;
    const float* __restrict__ u = U + p * S;
    for (int64_t k = 0; k < C; ++k) row[k] -= u[k];
    float m = row[0];
    for (int64_t k = 1; k < C; ++k) m = row[k] > m ? row[k] : m;
    for (int64_t k = 0; k < C; ++k) row[k] = exp_nonpositive(row[k] - m);
    float s = 0.f;
    for (int64_t k = 0; k < C; ++k) s += row[k];
    const float inv = 1.f / s;
    for (int64_t k = 0; k < C; ++k) row[k] *= inv;
    for (int64_t k = C; k < S; ++k) row[k] = 0.f;
  }
}

// With Q = softmax(a): g[p, :C] (dL/dQ) becomes dL/da = Q (g - <Q, g>), and dU -= dL/da; the
// padding lanes of g stay 0.
FASTSEG_CPU_CLONES void softmax_backward_rows(const float* __restrict__ Q, float* __restrict__ g,
                                              float* __restrict__ dU, int64_t S, int64_t C,
                                              int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* __restrict__ q = Q + p * S;
    float* __restrict__ r = g + p * S;
    float* __restrict__ du = dU + p * S;
    float dot = 0.f;
    for (int64_t k = 0; k < C; ++k) dot += q[k] * r[k];
    for (int64_t k = 0; k < C; ++k) {
      const float ga = q[k] * (r[k] - dot);
      r[k] = ga;
      du[k] -= ga;
    }
    for (int64_t k = C; k < S; ++k) r[k] = 0.f;
  }
}

// ---- one image ---------------------------------------------------------------------------------

// V [M, S] = the lattice values of in [P, S] after splat and blur (directions 0..D, or D..0 for
// the adjoint).
void filter_vertices(const Lattice& L, const float* in, int64_t S, Buffer<float>& V,
                     bool adjoint) {
  const int64_t M = L.M;
  V.reset(M * S);
  for_column_blocks(S, [&](auto width, int64_t col, int64_t lanes) {
    constexpr int W = decltype(width)::value;
    at::parallel_for(0, M, kVertexGrain, [&](int64_t begin, int64_t end) {
      splat_rows<W>(L.start.data(), L.pixel.data(), L.splat_w.data(), in + col, S, lanes,
                    V.data() + col, begin, end);
    });
    for (int step = 0; step < L.K; ++step) {
      const int j = adjoint ? L.K - 1 - step : step;
      at::parallel_for(L.chain_dir[j], L.chain_dir[j + 1], 64, [&](int64_t begin, int64_t end) {
        blur_chains<W>(L.chain_node.data(), L.chain_off.data(), begin, end, V.data() + col, S,
                       lanes);
      });
    }
  });
}

// out[p, :] = sum of the slices of a (values Va) and b (values Vb) for p in [p0, p1).
void slice_pair(const Lattice& a, const Buffer<float>& Va, const Lattice& b,
                const Buffer<float>& Vb, int64_t S, float* out, int64_t p0, int64_t p1) {
  for_column_blocks(S, [&](auto width, int64_t col, int64_t lanes) {
    constexpr int W = decltype(width)::value;
    slice_rows<W>(a.vertex.data(), a.slice_w.data(), a.K, Va.data() + col, b.vertex.data(),
                  b.slice_w.data(), b.K, Vb.data() + col, S, lanes, out + col, p0, p1);
  });
}

// Folds D^-1/2 (D = K 1, filtered by the lattice itself) into the splat weights, and D^-1/2 times
// the compatibility into the slice weights.
void normalise(Lattice& L, float compat) {
  const int64_t P = L.P, K = L.K;
  Buffer<float> ones(P, 1.f), norm(P), V;
  filter_vertices(L, ones.data(), 1, V, /*adjoint=*/false);
  at::parallel_for(0, P, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float d = 0.f;
      for (int64_t r = 0; r < K; ++r) d += L.slice_w[p * K + r] * V[L.vertex[p * K + r]];
      norm[p] = 1.f / std::sqrt(d + 1e-20f);
      for (int64_t r = 0; r < K; ++r) L.slice_w[p * K + r] *= norm[p] * compat;
    }
  });
  at::parallel_for(0, L.M, kVertexGrain, [&](int64_t begin, int64_t end) {
    for (int64_t e = L.start[begin]; e < L.start[end]; ++e) L.splat_w[e] *= norm[L.pixel[e]];
  });
}

class CrfImage {
 public:
  // image: [3, P] (0..255); rows of C labels at stride S.
  CrfImage(const float* image, int64_t H, int64_t W, int64_t C, int64_t S, const Params& prm)
      : P_(H * W), C_(C), S_(S) {
    Buffer<float> feats(P_ * 5);
    at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        feats[p * 2 + 0] = static_cast<float>(p % W) / prm.pos_sxy;
        feats[p * 2 + 1] = static_cast<float>(p / W) / prm.pos_sxy;
      }
    });
    pos_ = build_lattice<2>(feats.data(), P_);
    at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float* f = feats.data() + p * 5;
        f[0] = static_cast<float>(p % W) / prm.bi_sxy;
        f[1] = static_cast<float>(p / W) / prm.bi_sxy;
        for (int k = 0; k < 3; ++k) f[2 + k] = image[k * P_ + p] / prm.bi_srgb;
      }
    });
    bi_ = build_lattice<5>(feats.data(), P_);
    normalise(pos_, prm.pos_compat);
    normalise(bi_, prm.bi_compat);
  }

  // Q_t = softmax(-U + M Q_{t-1}) for t = 1..T from Q_0 = softmax(-U); U, Q_t [P, S] (padding
  // lanes of U are ignored, those of Q_t are 0). Q(t) gives the buffer of Q_t (Q(0) is written
  // first); buffers may repeat (ping-pong).
  template <typename QBuf>
  void forward(const float* U, int64_t T, const QBuf& Q) {
    float* q0 = Q(0);
    at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
      slice_softmax(/*with_message=*/false, U, q0, begin, end);
    });
    for (int64_t t = 1; t <= T; ++t) {
      message(Q(t - 1), /*adjoint=*/false);
      float* next = Q(t);
      at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
        slice_softmax(/*with_message=*/true, U, next, begin, end);
      });
    }
  }

  // dU [P, S] from g = dL/dQ_T [P, S] (overwritten; padding lanes 0) and the trajectory Q(0..T).
  template <typename QBuf>
  void backward(float* g, int64_t T, const QBuf& Q, float* dU) {
    const int64_t S = S_;
    at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
      std::fill(dU + begin * S, dU + end * S, 0.f);
      softmax_backward_rows(Q(T), g, dU, S, C_, begin, end);
    });
    // g holds dL/da_t; dL/dQ_{t-1} = M^T dL/da_t, then through Q_{t-1} = softmax(a_{t-1}).
    for (int64_t t = T; t >= 1; --t) {
      message(g, /*adjoint=*/true);
      const float* q = Q(t - 1);
      at::parallel_for(0, P_, kPixelGrain, [&](int64_t begin, int64_t end) {
        slice_pair(pos_, pos_v_, bi_, bi_v_, S, g, begin, end);
        softmax_backward_rows(q, g, dU, S, C_, begin, end);
      });
    }
  }

 private:
  void message(const float* values, bool adjoint) {
    filter_vertices(pos_, values, S_, pos_v_, adjoint);
    filter_vertices(bi_, values, S_, bi_v_, adjoint);
  }

  // out[p] = softmax(M values - U[p]) (values: those of the last message) or softmax(-U[p])
  // for p in [p0, p1).
  void slice_softmax(bool with_message, const float* U, float* out, int64_t p0, int64_t p1) const {
    const int64_t S = S_;
    if (S > 32) {  // several column blocks: slice them, then the softmax over whole rows
      if (with_message)
        slice_pair(pos_, pos_v_, bi_, bi_v_, S, out, p0, p1);
      else
        std::fill(out + p0 * S, out + p1 * S, 0.f);
      softmax_rows(out, U, S, C_, p0, p1);
      return;
    }
    for_column_blocks(S, [&](auto width, int64_t, int64_t) {
      constexpr int W = decltype(width)::value;
      if (with_message)
        slice_softmax_rows<W>(pos_.vertex.data(), pos_.slice_w.data(), pos_.K, pos_v_.data(),
                              bi_.vertex.data(), bi_.slice_w.data(), bi_.K, bi_v_.data(), U, S,
                              C_, out, p0, p1);
      else
        slice_softmax_rows<W>(nullptr, nullptr, 0, nullptr, nullptr, nullptr, 0, nullptr, U, S,
                              C_, out, p0, p1);
    });
  }

  int64_t P_, C_, S_;
  Lattice pos_, bi_;
  Buffer<float> pos_v_, bi_v_;  // lattice values [M, S] of the last message
};

// ---- ops ---------------------------------------------------------------------------------------

void check_cpu_inputs(const at::Tensor& unary, const at::Tensor& image, const Params& prm,
                      const char* op) {
  TORCH_CHECK(unary.device().is_cpu(), "unary must be a CPU tensor for the cpu kernel of ", op,
              ", got ", unary.device());
  TORCH_CHECK(image.device().is_cpu(), "image must be a CPU tensor for the cpu kernel of ", op,
              ", got ", image.device());
  const int64_t H = unary.size(2), W = unary.size(3), P = H * W;
  TORCH_CHECK(P * 6 < std::numeric_limits<int32_t>::max(), "image of ", H, " x ", W,
              " pixels is too large for the cpu kernel of ", op);
  dense_crf_lattice_check(image, prm.pos_sxy, prm.bi_sxy, prm.bi_srgb);
}

// Runs fn(n) for every image: in parallel over images when N > 1, else inside the image.
template <typename Fn>
void for_each_image(int64_t N, const Fn& fn) {
  if (N == 1) {
    fn(0);
    return;
  }
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) fn(n);
  });
}

// dst [P, S] = src [C, P] transposed, lanes C..S zero.
void planes_to_rows(const float* src, int64_t C, int64_t P, int64_t S, float* dst) {
  at::parallel_for(0, P, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += 64) {
      const int64_t e = std::min(end, b + 64);
      for (int64_t p = b; p < e; ++p) std::fill(dst + p * S + C, dst + (p + 1) * S, 0.f);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = b; p < e; ++p) dst[p * S + c] = src[c * P + p];
    }
  });
}

// dst [C, P] = the first C lanes of src [P, S] transposed.
void rows_to_planes(const float* src, int64_t C, int64_t P, int64_t S, float* dst) {
  at::parallel_for(0, P, kPixelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += 64) {
      const int64_t e = std::min(end, b + 64);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = b; p < e; ++p) dst[c * P + p] = src[p * S + c];
    }
  });
}

at::Tensor dense_crf_cpu(const at::Tensor& unary, const at::Tensor& image, int64_t iterations,
                         double pos_sxy, double pos_compat, double bi_sxy, double bi_srgb,
                         double bi_compat) {
  dense_crf_check(unary, image, iterations, pos_sxy, bi_sxy, bi_srgb);
  const Params prm = dense_crf_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat);
  check_cpu_inputs(unary, image, prm, "dense_crf");
  auto q = at::empty(unary.sizes(), unary.options());
  if (q.numel() == 0) return q;
  const int64_t N = unary.size(0), C = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t P = H * W, S = row_stride(C);
  const auto u = unary.contiguous(), img = image.contiguous();
  const float* up = u.const_data_ptr<float>();
  const float* ip = img.const_data_ptr<float>();
  float* qp = q.mutable_data_ptr<float>();
  for_each_image(N, [&](int64_t n) {
    Buffer<float> rows(P * S), a(P * S), b(iterations > 0 ? P * S : 0);
    planes_to_rows(up + n * C * P, C, P, S, rows.data());
    CrfImage crf(ip + n * 3 * P, H, W, C, S, prm);
    crf.forward(rows.data(), iterations,
                [&](int64_t t) { return (iterations - t) % 2 == 0 ? a.data() : b.data(); });
    rows_to_planes(a.data(), C, P, S, qp + n * C * P);
  });
  return q;
}

at::Tensor dense_crf_backward_cpu(const at::Tensor& grad, const at::Tensor& unary,
                                  const at::Tensor& image, int64_t iterations, double pos_sxy,
                                  double pos_compat, double bi_sxy, double bi_srgb,
                                  double bi_compat) {
  dense_crf_backward_check(grad, unary, image, iterations, pos_sxy, bi_sxy, bi_srgb);
  const Params prm = dense_crf_params(iterations, pos_sxy, pos_compat, bi_sxy, bi_srgb, bi_compat);
  check_cpu_inputs(unary, image, prm, "_dense_crf_backward");
  TORCH_CHECK(grad.device().is_cpu(), "grad must be a CPU tensor for the cpu kernel, got ",
              grad.device());
  auto du = at::empty(unary.sizes(), unary.options());
  if (du.numel() == 0) return du;
  const int64_t N = unary.size(0), C = unary.size(1), H = unary.size(2), W = unary.size(3);
  const int64_t P = H * W, S = row_stride(C);
  const auto u = unary.contiguous(), img = image.contiguous(), gr = grad.contiguous();
  const float* up = u.const_data_ptr<float>();
  const float* ip = img.const_data_ptr<float>();
  const float* gp = gr.const_data_ptr<float>();
  float* dup = du.mutable_data_ptr<float>();
  for_each_image(N, [&](int64_t n) {
    Buffer<float> rows(P * S), g(P * S), d(P * S), traj((iterations + 1) * P * S);
    planes_to_rows(up + n * C * P, C, P, S, rows.data());
    planes_to_rows(gp + n * C * P, C, P, S, g.data());
    CrfImage crf(ip + n * 3 * P, H, W, C, S, prm);
    const auto Q = [&](int64_t t) { return traj.data() + t * P * S; };
    crf.forward(rows.data(), iterations, Q);
    crf.backward(g.data(), iterations, Q, d.data());
    rows_to_planes(d.data(), C, P, S, dup + n * C * P);
  });
  return du;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastseg, CPU, m) {
  m.impl("dense_crf", &dense_crf_cpu);
  m.impl("_dense_crf_backward", &dense_crf_backward_cpu);
}

}  // namespace fastseg::ops
