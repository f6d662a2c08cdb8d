// CPU kernels of kcd_fast: parallel LSD radix sort for rank (Eq. 13) and the
// VAKS row mixing (Eq. 14). Arguments are validated by kcd_fast/ops.py; the
// TORCH_CHECKs here only guard the kernels' own assumptions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"

namespace kcd_fast {
namespace {

constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;

// Stable LSD radix sort of (key, index) pairs by key, ascending, with a
// per-chunk histogram and scatter on each of at::get_num_threads() chunks.
// Passes whose digit is the same for every key are skipped.
void radix_sort_pairs(std::vector<uint32_t>& keys, std::vector<int64_t>& idx) {
  const int64_t n = static_cast<int64_t>(keys.size());
  std::vector<uint32_t> keys_alt(n);
  std::vector<int64_t> idx_alt(n);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 16384 + 1));
  const int64_t chunk = (n + chunks - 1) / chunks;
  std::vector<int64_t> hist(chunks * kRadixBins);
  for (int shift = 0; shift < 32; shift += kRadixBits) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * kRadixBins;
        const int64_t end = std::min(n, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) ++h[(keys[i] >> shift) & (kRadixBins - 1)];
      }
    });
    // Skip the pass if one bin holds everything.
    bool trivial = false;
    for (int b = 0; b < kRadixBins && !trivial; ++b) {
      int64_t total = 0;
      for (int64_t c = 0; c < chunks; ++c) total += hist[c * kRadixBins + b];
      if (total == n) trivial = true;
      else if (total != 0) break;
    }
    if (trivial) continue;
    // Exclusive prefix in (bin, chunk) order: stable across chunks.
    int64_t running = 0;
    for (int b = 0; b < kRadixBins; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        int64_t cnt = hist[c * kRadixBins + b];
        hist[c * kRadixBins + b] = running;
        running += cnt;
      }
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * kRadixBins;
        const int64_t end = std::min(n, (c + 1) * chunk);
        for (int64_t i = c * chunk; i < end; ++i) {
          const int64_t dst = h[(keys[i] >> shift) & (kRadixBins - 1)]++;
          keys_alt[dst] = keys[i];
          idx_alt[dst] = idx[i];
        }
      }
    });
    keys.swap(keys_alt);
    idx.swap(idx_alt);
  }
}

// Eq. 7: entropy of softmax(row / T), two passes over the row (max, then the
// sums s = sum e^(z-m), t = sum e^(z-m)(z-m)); H = log s - t / s. Each term is
// fp32, as on CUDA; the sums are float64, so that a long row (an LLM's 128k
// classes) loses no more than the CUDA kernel's tree reduction (about 1e-7),
// where a sequential fp32 sum loses 1e-4. NaN if any logit is not finite.
template <typename scalar_t>
float row_entropy(const scalar_t* row, int64_t stride, int64_t classes, float inv_temperature) {
  float m = -INFINITY;
  for (int64_t c = 0; c < classes; ++c) {
    const float x = static_cast<float>(row[c * stride]);
    if (!std::isfinite(x)) return NAN;
    m = std::max(m, x * inv_temperature);
  }
  double s = 0.0, t = 0.0;
  for (int64_t c = 0; c < classes; ++c) {
    const float d = static_cast<float>(row[c * stride]) * inv_temperature - m;
    const float e = std::exp(d);
    s += e;
    t += static_cast<double>(e * d);
  }
  return static_cast<float>(std::log(s) - t / s);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KCD_FAST_HAVE_AVX2 1
// Eq. 7 for a contiguous row, 8 classes at a time (AVX2 + FMA): the scalar loop spends most of its
// time in std::exp, one element at a time, and is slower than the official code's torch softmax
// at C = 100. The same two passes and float64 sums as row_entropy; e^d is a degree-6
// polynomial after the usual reduction d = n ln2 + r (|error| about 1 ulp, against std::exp's
// 0.5), so the two paths agree to about 1e-7, not bit for bit. Chosen at run time where the CPU
// has AVX2 and FMA; KCD_FAST_NO_AVX2=1 forces the scalar path (the tests compare both).
__attribute__((target("avx2,fma"))) inline __m256 exp_nonpositive(__m256 d) {
  // e^d for d <= 0; 0 below -87.3 (where e^d is below the normal floats).
  const __m256 x = _mm256_max_ps(d, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: r = x - n ln2
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
  return _mm256_and_ps(e, _mm256_cmp_ps(d, _mm256_set1_ps(-87.3f), _CMP_GE_OQ));
}

// 8 logits as fp32, from fp32, bf16 (the upper half of an fp32) or fp16 (F16C).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

__attribute__((target("avx2,fma"))) inline double sum_as_double(__m256 v) {
  const __m256d both = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(both), _mm256_extractf128_pd(both, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"))) float row_entropy_avx2(const scalar_t* row, int64_t classes,
                                                                 float inv_temperature) {
  const __m256 inv_t = _mm256_set1_ps(inv_temperature);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 inf = _mm256_set1_ps(INFINITY);
  __m256 m8 = _mm256_set1_ps(-INFINITY);
  __m256 finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t c = 0;
  for (; c + 8 <= classes; c += 8) {
    const __m256 x = load8(row + c);
    finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_and_ps(x, abs_mask), inf, _CMP_LT_OQ));
    m8 = _mm256_max_ps(m8, _mm256_mul_ps(x, inv_t));
  }
  if (_mm256_movemask_ps(finite) != 0xff) return NAN;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
  for (int64_t j = c; j < classes; ++j) {
    const float x = static_cast<float>(row[j]);
    if (!std::isfinite(x)) return NAN;
    m = std::max(m, x * inv_temperature);
  }
  // The sums: per 64 classes in fp32 lanes (8 terms a lane), then added in float64.
  const __m256 m_8 = _mm256_set1_ps(m);
  double s = 0.0, t = 0.0;
  c = 0;
  while (c + 8 <= classes) {
    __m256 s8 = _mm256_setzero_ps(), t8 = _mm256_setzero_ps();
    const int64_t end = std::min(classes - classes % 8, c + 64);
    for (; c < end; c += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_mul_ps(load8(row + c), inv_t), m_8);
      const __m256 e = exp_nonpositive(d);
      s8 = _mm256_add_ps(s8, e);
      t8 = _mm256_add_ps(t8, _mm256_mul_ps(e, d));
    }
    s += sum_as_double(s8);
    t += sum_as_double(t8);
  }
  for (; c < classes; ++c) {
    const float d = static_cast<float>(row[c]) * inv_temperature - m;
    const float e = std::exp(d);
    s += e;
    t += static_cast<double>(e * d);
  }
  return static_cast<float>(std::log(s) - t / s);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}
#endif

// The AVX2 path for contiguous fp32/bf16/fp16 rows where it may be used, the scalar one otherwise.
template <typename scalar_t>
inline float row_entropy_dispatch(const scalar_t* row, int64_t stride, int64_t classes, float inv_temperature,
                                  [[maybe_unused]] bool use_avx2) {
#ifdef KCD_FAST_HAVE_AVX2
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (use_avx2 && stride == 1) return row_entropy_avx2(row, classes, inv_temperature);
  }
#endif
  return row_entropy(row, stride, classes, inv_temperature);
}

at::Tensor update_values_cpu(at::Tensor& values, at::Tensor& counts, const at::Tensor& indices,
                             const at::Tensor& logits, double temperature) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && counts.scalar_type() == at::kInt && values.is_contiguous() &&
                  counts.is_contiguous(),
              "kcd_fast::update_values: values must be contiguous float32 and counts contiguous int32");
  TORCH_CHECK(values.dim() == 1 && counts.sizes() == values.sizes(),
              "kcd_fast::update_values: values and counts must be 1-D of the same size");
  TORCH_CHECK(logits.dim() == 2 && indices.dim() == 1 && indices.size(0) == logits.size(0),
              "kcd_fast::update_values: logits must be [B, C] and indices [B]");
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              "kcd_fast::update_values: indices must be int32 or int64");
  // 1/T must be a finite float32 (T >= 1/FLT_MAX): every kernel scales the logits by it in fp32.
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0 &&
                        1.0 / temperature <= static_cast<double>(std::numeric_limits<float>::max()),
                    "update_values: `temperature` must be a finite number > 0 whose inverse is a finite float32");
  const int64_t batch = logits.size(0), classes = logits.size(1), n = values.numel();
  at::Tensor entropy = at::empty({batch}, values.options());
  if (batch == 0) return entropy;
  const at::Tensor idx = indices.to(at::kLong);
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t is = idx.stride(0);
  // Check every index before anything changes: state stays untouched on error.
  for (int64_t b = 0; b < batch; ++b) {
    // Numbers are formatted with std::to_string, not streamed: a g++ newer than the runtime
    // libstdc++ instantiates the stream's integer output in this library, which then crashes.
    TORCH_CHECK_VALUE(ip[b * is] >= 0 && ip[b * is] < n, "update_values: `indices` must lie in [0, ",
                      std::to_string(n), "), found ", std::to_string(ip[b * is]));
  }
  float* ep = entropy.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
#ifdef KCD_FAST_HAVE_AVX2
  const bool use_avx2 = cpu_has_avx2_fma() && !std::getenv("KCD_FAST_NO_AVX2");  // the switch: tests compare both
#else
  const bool use_avx2 = false;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "update_values_cpu", [&] {
    const scalar_t* base = logits.const_data_ptr<scalar_t>();
    const int64_t s0 = logits.stride(0), s1 = logits.stride(1);
    at::parallel_for(0, batch, std::max<int64_t>(1, 16384 / std::max<int64_t>(classes, 1)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) ep[b] = row_entropy_dispatch(base + b * s0, s1, classes, inv_t, use_avx2);
    });
  });
  // Eq. 12, one visit at a time in batch order (duplicates are successive visits).
  float* vp = values.data_ptr<float>();
  int32_t* fp = counts.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const float e = ep[b];
    if (std::isnan(e)) continue;
    const int64_t i = ip[b * is];
    const int32_t f = ++fp[i];
    vp[i] += (e - vp[i]) / static_cast<float>(f);
  }
  return entropy;
}

at::Tensor rank_cpu(const at::Tensor& values, const at::Tensor& counts, double alpha) {
  check_rank_args(values, counts);
  const at::Tensor v = values.contiguous();
  const at::Tensor f = counts.contiguous();
  const int64_t n = v.numel();
  const float* vp = v.data_ptr<float>();
  const int32_t* fp = f.data_ptr<int32_t>();
  std::vector<uint32_t> keys(n);
  std::vector<int64_t> idx(n);
  const CostTable table = make_cost_table(alpha);
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t c = fp[i];
      const double w = (c >= 0 && c < kCostTable) ? table.cost[c] : std::pow(static_cast<double>(c), alpha);
      keys[i] = descending_bits(ranking_key_from_cost(vp[i], w));
      idx[i] = i;
    }
  });
  radix_sort_pairs(keys, idx);
  at::Tensor order = at::empty({n}, v.options().dtype(at::kLong));
  std::copy(idx.begin(), idx.end(), order.data_ptr<int64_t>());
  return order;
}

template <typename scalar_t>
inline scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}
template <>
inline uint8_t from_float<uint8_t>(float x) {
  // Round to nearest, ties to even (the default FP environment), then clamp.
  return static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(x))));
}

// One row pair of Eq. 14 in fp32, written back in the buffer's type: out = keep * out + w * other.
template <typename scalar_t>
inline void mix_row(scalar_t* out, const scalar_t* other, float keep, float w, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = from_float<scalar_t>(keep * static_cast<float>(out[j]) + w * static_cast<float>(other[j]));
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KCD_FAST_HAVE_F16C 1
// fp16 rows with the F16C conversions, 8 at a time: the scalar c10::Half conversions cost several
// integer operations per element and make the scalar path slower than eager PyTorch. The result is the
// scalar path's bit for bit: the same fp32 products and sum (no FMA), and round-to-nearest-even
// back to fp16, as c10::Half does. Chosen at run time, where the CPU has F16C (every x86-64 CPU
// since 2012).
__attribute__((target("avx,f16c"))) void mix_row_f16c(c10::Half* out, const c10::Half* other, float keep, float w,
                                                      int64_t n) {
  const __m256 k8 = _mm256_set1_ps(keep), w8 = _mm256_set1_ps(w);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(out + j)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(other + j)));
    const __m256 r = _mm256_add_ps(_mm256_mul_ps(k8, a), _mm256_mul_ps(w8, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT));
  }
  mix_row(out + j, other + j, keep, w, n - j);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

// The F16C path for fp16 rows where it may be used, the scalar one otherwise.
template <typename scalar_t>
inline void mix_row_dispatch(scalar_t* out, const scalar_t* other, float keep, float w, int64_t n,
                             [[maybe_unused]] bool use_f16c) {
#ifdef KCD_FAST_HAVE_F16C
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (use_f16c) {
      mix_row_f16c(out, other, keep, w, n);
      return;
    }
  }
#endif
  mix_row(out, other, keep, w, n);
}

// Every pair's rows lie in [0, rows): checked before anything is written, since the raw ops
// (torch.ops.kcd_fast.*) may be called without ops.py's checks and would write outside the buffer.
void check_pair_ranges(const char* op, const int64_t* dp, const int64_t* sp, int64_t pairs, int64_t rows) {
  for (int64_t p = 0; p < pairs; ++p) {
    TORCH_CHECK_VALUE(dp[p] >= 0 && dp[p] < rows, op, ": `dst` must lie in [0, ", std::to_string(rows), "), found ",
                      std::to_string(dp[p]));
    TORCH_CHECK_VALUE(sp[p] >= 0 && sp[p] < rows, op, ": `src` must lie in [0, ", std::to_string(rows), "), found ",
                      std::to_string(sp[p]));
  }
}

void vaks_mix_cpu(at::Tensor& buffer, const at::Tensor& dst, const at::Tensor& src, const at::Tensor& eps) {
  check_mix_args(buffer, dst, src, eps);
  const int64_t pairs = dst.numel();
  if (pairs == 0 || buffer.numel() == 0) return;
  const int64_t row = buffer.numel() / buffer.size(0);
  const at::Tensor d = dst.contiguous(), s = src.contiguous(), e = eps.contiguous();
  const int64_t* dp = d.data_ptr<int64_t>();
  const int64_t* sp = s.data_ptr<int64_t>();
  check_pair_ranges("vaks_mix_", dp, sp, pairs, buffer.size(0));
  const float* ep = e.data_ptr<float>();
#ifdef KCD_FAST_HAVE_F16C
  const bool use_f16c = cpu_has_f16c() && !std::getenv("KCD_FAST_NO_F16C");  // the switch: tests compare both
#else
  const bool use_f16c = false;
#endif
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, buffer.scalar_type(), "vaks_mix_cpu", [&] {
    scalar_t* base = buffer.data_ptr<scalar_t>();
    at::parallel_for(0, pairs, std::max<int64_t>(1, 32768 / std::max<int64_t>(row, 1)), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        scalar_t* out = base + dp[p] * row;
        const scalar_t* other = base + sp[p] * row;
        const float w = ep[p];
        const float keep = 1.0f - w;
        mix_row_dispatch(out, other, keep, w, row, use_f16c);
      }
    });
  });
}

void vaks_mix_topk_cpu(at::Tensor& values, at::Tensor& classes, const at::Tensor& dst, const at::Tensor& src,
                       const at::Tensor& eps, int64_t num_classes) {
  const int k = check_topk_args(values, classes, dst, src, eps);
  const int64_t pairs = dst.numel();
  if (pairs == 0) return;
  const at::Tensor d = dst.contiguous(), s = src.contiguous(), e = eps.contiguous();
  const int64_t* dp = d.data_ptr<int64_t>();
  const int64_t* sp = s.data_ptr<int64_t>();
  check_pair_ranges("vaks_mix_topk_", dp, sp, pairs, values.size(0));
  const float* ep = e.data_ptr<float>();
  int32_t* cls = classes.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "vaks_mix_topk_cpu", [&] {
    scalar_t* val = values.data_ptr<scalar_t>();
    at::parallel_for(0, pairs, 256, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        mix_topk_row(val + dp[p] * k, cls + dp[p] * k, val + sp[p] * k, cls + sp[p] * k, k, num_classes, ep[p],
                     [](scalar_t x) { return static_cast<float>(x); },
                     [](float x) { return static_cast<scalar_t>(x); });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kcd_fast, CPU, m) {
  m.impl("vaks_mix_topk_", &vaks_mix_topk_cpu);
  m.impl("update_values", &update_values_cpu);
  m.impl("rank", &rank_cpu);
  m.impl("vaks_mix_", &vaks_mix_cpu);
}

}  // namespace kcd_fast
