// Shared helpers of the kcd_fast kernels (CPU and CUDA).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KCD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KCD_HOST_DEVICE inline
#endif

namespace kcd_fast {

// The ranking key of Eq. 13: V * F^alpha (cost = F^alpha) computed in double
// and rounded to float32, the precision of `values`. NaN ranks last (as
// -inf); -0 is +0.
KCD_HOST_DEVICE float ranking_key_from_cost(float value, double cost) {
  double s = static_cast<double>(value) * cost;
  float k = static_cast<float>(s);
  if (k != k) k = -INFINITY;
  return k + 0.0f;
}

// F^alpha for F < kCostTable, computed on the host with std::pow and used by
// both the CPU and the CUDA kernels, so both rank on bitwise-equal keys for
// the counts a run produces (larger counts use the device's pow on CUDA).
constexpr int kCostTable = 512;
struct CostTable {
  double cost[kCostTable];
};

inline CostTable make_cost_table(double alpha) {
  CostTable t;
  for (int c = 0; c < kCostTable; ++c) t.cost[c] = std::pow(static_cast<double>(c), alpha);
  return t;
}


// Maps a float key to an unsigned integer whose ascending order is the
// key's descending order, so that a stable ascending radix sort over it gives
// "descending score, then ascending index".
KCD_HOST_DEVICE uint32_t descending_bits(float key) {
  uint32_t u;
#if defined(__CUDA_ARCH__)
  u = __float_as_uint(key);
#else
  std::memcpy(&u, &key, sizeof(u));
#endif
  u ^= (u >> 31) ? 0xFFFFFFFFu : 0x80000000u;  // ascending order of floats
  return ~u;                                     // descending
}

// Eq. 14 on one pair of top-k rows (see kcd_fast::vaks_mix_topk_). The candidates are the union
// of both rows' classes and the k smallest classes in neither (which hold the uniform value u and
// win ties among themselves by lower id); the new row is their top k by (mixed mass desc, class
// asc). kMaxTopK bounds k so the candidates fit in registers/local memory on the GPU.
constexpr int kMaxTopK = 64;

template <typename value_t, typename load_t, typename store_t>
KCD_HOST_DEVICE void mix_topk_row(value_t* dv, int32_t* dc, const value_t* sv, const int32_t* sc, int k,
                                  int64_t num_classes, float eps, load_t load, store_t store) {
  float cand_m[3 * kMaxTopK];
  int32_t cand_c[3 * kMaxTopK];
  float da[kMaxTopK], sa[kMaxTopK];
  int32_t dcl[kMaxTopK], scl[kMaxTopK];
  float rest_d = 1.0f, rest_s = 1.0f;
  for (int j = 0; j < k; ++j) {
    da[j] = load(dv[j]);
    sa[j] = load(sv[j]);
    dcl[j] = dc[j];
    scl[j] = sc[j];
    rest_d -= da[j];
    rest_s -= sa[j];
  }
  const float others = num_classes > k ? static_cast<float>(num_classes - k) : 1.0f;
  const float ud = num_classes > k ? fmaxf(rest_d, 0.0f) / others : 0.0f;
  const float us = num_classes > k ? fmaxf(rest_s, 0.0f) / others : 0.0f;
  const float keep = 1.0f - eps;
  int n = 0;
  // Classes of the destination row (and their partner's mass, stored or uniform).
  for (int j = 0; j < k; ++j) {
    float b = us;
    for (int i = 0; i < k; ++i)
      if (scl[i] == dcl[j]) b = sa[i];
    cand_c[n] = dcl[j];
    cand_m[n++] = keep * da[j] + eps * b;
  }
  // Classes only the source row holds.
  for (int i = 0; i < k; ++i) {
    bool seen = false;
    for (int j = 0; j < k; ++j) seen |= (dcl[j] == scl[i]);
    if (!seen) {
      cand_c[n] = scl[i];
      cand_m[n++] = keep * ud + eps * sa[i];
    }
  }
  // The k smallest classes in neither row: the uniform mass u, lowest ids first.
  const float u = keep * ud + eps * us;
  int fillers = 0;
  for (int64_t c = 0; c < num_classes && fillers < k; ++c) {
    bool used = false;
    for (int i = 0; i < n && !used; ++i) used = (cand_c[i] == c);
    if (!used) {
      cand_c[n] = static_cast<int32_t>(c);
      cand_m[n++] = u;
      ++fillers;
    }
  }
  // Partial selection sort: the k best by (mass desc, class asc).
  for (int j = 0; j < k && j < n; ++j) {
    int best = j;
    for (int i = j + 1; i < n; ++i) {
      if (cand_m[i] > cand_m[best] || (cand_m[i] == cand_m[best] && cand_c[i] < cand_c[best])) best = i;
    }
    const float tm = cand_m[j];
    cand_m[j] = cand_m[best];
    cand_m[best] = tm;
    const int32_t tc = cand_c[j];
    cand_c[j] = cand_c[best];
    cand_c[best] = tc;
    dv[j] = store(cand_m[j]);
    dc[j] = cand_c[j];
  }
}

}  // namespace kcd_fast
