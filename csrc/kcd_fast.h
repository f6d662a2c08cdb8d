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

}  // namespace kcd_fast
