#pragma once
// The permutohedral lattice of Adams, Baek & Davis (2010), "Fast high-dimensional filtering using
// the permutohedral lattice": the per-point math that the CPU and CUDA kernels of
// fastseg::dense_crf share.
//
// A feature vector f in R^D is scaled per axis and lifted ("elevated") onto the hyperplane
// H_D = {x in R^(D+1) : sum x = 0}. The lattice A*_D tiles H_D with simplices; its points are the
// integer vectors of H_D whose coordinates are all congruent mod D+1, and a point whose
// coordinates are all == k mod (D+1) has "remainder" k. The simplex enclosing x has one vertex of
// each remainder 0..D: vertex r is the remainder-0 vertex plus the canonical offset
//     r                 on the coordinates whose rank is <= D - r,
//     r - (D + 1)       on the others,
// where rank orders the coordinates of x - rem0 decreasingly. A point spreads ("splats") onto
// those D+1 vertices with its barycentric weights; "blur" convolves the lattice values with
// [1/2, 1, 1/2] along each of the D+1 lattice directions e_j = (D+1) * unit_j - (1, ..., 1)
// (restricted to H_D); "slice" reads the vertices back with the same weights. With the scale
// below, slice(blur(splat(v))) approximates (up to a constant factor)
//     out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j.
//
// A lattice point is identified by its first D coordinates (the last one is minus their sum):
// its key, hashed by lattice_hash.
#include "ops/common/macros.h"

#include <cmath>
#include <cstdint>

namespace fastseg::common {

// Scale of feature axis i (0-based) in a D-dimensional lattice: (D+1) sqrt(2/3) / sqrt((i+1)(i+2)).
// The factor 1 / sqrt((i+1)(i+2)) normalises column i of the elevation matrix; (D+1) sqrt(2/3) is
// the standard deviation, in lattice units, of the D+1 [1/2, 1, 1/2] blurs, so that the filter
// approximates a Gaussian of unit standard deviation in feature space.
FASTSEG_HOST_DEVICE inline float lattice_axis_scale(int D, int i) {
  const double norm = sqrt(static_cast<double>((i + 1) * (i + 2)));
  return static_cast<float>(sqrt(2.0 / 3.0) * (D + 1) / norm);
}

// The simplex of the lattice that encloses one point, and the point's barycentric weights.
template <int D>
struct LatticeSimplex {
  int rem0[D + 1];        // the remainder-0 vertex
  int rank[D + 1];        // rank of each coordinate of (elevated - rem0), 0 = largest
  float weight[D + 1];    // barycentric weight of vertex r (remainder r), r = 0..D; sum = 1
};

// Elevates the feature f[D] (scaled per axis by scale[D]) onto H_D and finds its simplex.
template <int D>
FASTSEG_HOST_DEVICE inline void lattice_simplex(const float* f, const float* scale,
                                                LatticeSimplex<D>& s) {
  constexpr int K = D + 1;
  constexpr float kInv = 1.0f / K;
  // Elevation x = E (scale * f), E's column i = (1, ..., 1, -(i+1), 0, ..., 0) / norm (the
  // -(i+1) at row i+1): x_0 = sum_i c_i, x_j = sum_{i >= j} c_i - j c_{j-1} for j >= 1.
  float x[K];
  float tail = 0.f;
  for (int j = D; j > 0; --j) {
    const float c = f[j - 1] * scale[j - 1];
    x[j] = tail - static_cast<float>(j) * c;
    tail += c;
  }
  x[0] = tail;

  // Nearest remainder-0 lattice candidate per coordinate (multiples of K; halfway goes down).
  // floor and ceil through int conversion (callers keep |x| far below 2^31).
  int sum = 0;
  for (int i = 0; i < K; ++i) {
    const float v = x[i] * kInv;
    int lo = static_cast<int>(v);  // truncation toward zero
    lo -= static_cast<float>(lo) > v ? 1 : 0;
    const int hi = lo + (static_cast<float>(lo) < v ? 1 : 0);
    const float up = static_cast<float>(hi * K), down = static_cast<float>(lo * K);
    s.rem0[i] = up - x[i] < x[i] - down ? hi * K : lo * K;
    sum += s.rem0[i];
    s.rank[i] = 0;
  }
  sum /= K;  // exact: every rem0 is a multiple of K

  // Rank the residuals x - rem0 decreasingly; on ties the lower coordinate ranks first.
  // (Branch-free: the comparisons are unpredictable.)
  float diff[K];
  for (int i = 0; i < K; ++i) diff[i] = x[i] - static_cast<float>(s.rem0[i]);
  for (int i = 0; i < K; ++i)
    for (int j = i + 1; j < K; ++j) {
      const int c = diff[i] < diff[j] ? 1 : 0;
      s.rank[i] += c;
      s.rank[j] += 1 - c;
    }

  // rem0 sums to sum * K rather than 0: move the sum lowest- (sum > 0) or highest-ranked
  // (sum < 0) coordinates by K, which shifts every rank by sum (mod K).
  for (int i = 0; i < K; ++i) {
    const int r = s.rank[i] + sum;
    const int wrap = (r < 0 ? 1 : 0) - (r > D ? 1 : 0);  // +1: wrap up, -1: wrap down
    s.rank[i] = r + wrap * K;
    s.rem0[i] += wrap * K;
  }

  // Barycentric weights (Adams et al., Alg. 1): b[D - rank_i] += d_i, b[D + 1 - rank_i] -= d_i
  // with d_i = (x_i - rem0_i) / K, then b[0] += 1 + b[D + 1].
  float b[K + 1];
  for (int i = 0; i <= K; ++i) b[i] = 0.f;
  for (int i = 0; i < K; ++i) {
    const float v = (x[i] - static_cast<float>(s.rem0[i])) * kInv;
    b[D - s.rank[i]] += v;
    b[K - s.rank[i]] -= v;
  }
  b[0] += 1.f + b[K];
  for (int r = 0; r < K; ++r) s.weight[r] = b[r];
}

// Key (first D coordinates) of vertex r (remainder r, 0..D) of the simplex s.
template <int D>
FASTSEG_HOST_DEVICE inline void lattice_vertex_key(const LatticeSimplex<D>& s, int r, int* key) {
  for (int i = 0; i < D; ++i) key[i] = s.rem0[i] + (s.rank[i] <= D - r ? r : r - (D + 1));
}

// Key of the neighbour of `key` along lattice direction j (0..D), on the + (sign > 0) or - side:
// key + sign * e_j with e_j = (D+1) unit_j - (1, ..., 1); for j = D only the -1s are in the key.
template <int D>
FASTSEG_HOST_DEVICE inline void lattice_neighbour_key(const int* key, int j, int sign, int* out) {
  for (int i = 0; i < D; ++i) out[i] = key[i] - sign;
  if (j < D) out[j] += sign * (D + 1);
}

// 32-bit hash of a key: a polynomial in the coordinates, then murmur3's finaliser.
template <int D>
FASTSEG_HOST_DEVICE inline uint32_t lattice_hash(const int* key) {
  uint32_t h = 0;
  for (int i = 0; i < D; ++i) h = h * 0x9E3779B1u + static_cast<uint32_t>(key[i]);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

template <int D>
FASTSEG_HOST_DEVICE inline bool lattice_key_equal(const int* a, const int* b) {
  for (int i = 0; i < D; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

}  // namespace fastseg::common
