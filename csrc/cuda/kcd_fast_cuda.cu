// CUDA kernels of kcd_fast: the global ranking (Eq. 13) as one key kernel and
// a CUB radix sort of float keys carrying int32 payloads, and the VAKS row
// mixing (Eq. 14) as one fused gather-mix-scatter kernel. Arguments are
// validated by kcd_fast/ops.py; nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include "../checks.h"

namespace kcd_fast {
namespace {

// keys[i] = descending_bits(V_i * F_i^alpha); payload[i] = i. The host's
// F^alpha table travels as a kernel parameter (no copy, no sync) and is
// staged in shared memory.
__global__ void ranking_keys_kernel(const float* __restrict__ values, const int32_t* __restrict__ counts,
                                    const __grid_constant__ CostTable table, double alpha,
                                    uint32_t* __restrict__ keys, int32_t* __restrict__ payload, int64_t n) {
  __shared__ double cost[kCostTable];
  for (int c = threadIdx.x; c < kCostTable; c += blockDim.x) cost[c] = table.cost[c];
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t c = counts[i];
    const double w = (c >= 0 && c < kCostTable) ? cost[c] : pow(static_cast<double>(c), alpha);
    keys[i] = descending_bits(ranking_key_from_cost(values[i], w));
    payload[i] = static_cast<int32_t>(i);
  }
}

__global__ void widen_kernel(const int32_t* __restrict__ in, int64_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = in[i];
  }
}

int grid_for(int64_t n, int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * 32)));
}

at::Tensor rank_cuda(const at::Tensor& values, const at::Tensor& counts, double alpha) {
  check_rank_args(values, counts);
  TORCH_CHECK(values.numel() < (int64_t(1) << 31), "kcd_fast::rank: at most 2^31-1 points");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor v = values.contiguous();
  const at::Tensor f = counts.contiguous();
  const int64_t n = v.numel();
  at::Tensor order = at::empty({n}, v.options().dtype(at::kLong));
  if (n == 0) return order;
  auto stream = at::cuda::getCurrentCUDAStream();
  // keys_in | keys_out | payload_in | payload_out, one allocation.
  at::Tensor scratch = at::empty({4 * n}, v.options().dtype(at::kInt));
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(scratch.data_ptr<int32_t>());
  uint32_t* keys_out = keys_in + n;
  int32_t* payload_in = scratch.data_ptr<int32_t>() + 2 * n;
  int32_t* payload_out = payload_in + n;
  const int threads = 256;
  ranking_keys_kernel<<<grid_for(n, threads), threads, 0, stream>>>(
      v.data_ptr<float>(), f.data_ptr<int32_t>(), make_cost_table(alpha), alpha, keys_in, payload_in, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  const int items = static_cast<int>(n);
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, payload_in, payload_out,
                                                 items, 0, 32, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, v.options().dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in, keys_out, payload_in,
                                                 payload_out, items, 0, 32, stream));
  widen_kernel<<<grid_for(n, threads), threads, 0, stream>>>(payload_out, order.data_ptr<int64_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return order;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x) {
  return static_cast<scalar_t>(x);
}
template <>
__device__ __forceinline__ uint8_t from_float<uint8_t>(float x) {
  return static_cast<uint8_t>(fminf(255.0f, fmaxf(0.0f, rintf(x))));  // nearest, ties to even
}

// One warp per pair: row dst = (1-eps) row dst + eps row src, in fp32, with VEC elements (16 bytes
// when the rows allow it) per lane and load. Each lane first loads up to kUnroll packs of both rows,
// then mixes and stores them: the loads of a chunk are all in flight at once (the compiler cannot
// hoist them itself, since dst and src rows come from the same buffer). A 1000-wide fp16 row is 125
// packs, one chunk of 32 lanes x 4.
constexpr int kUnroll = 4;

template <typename scalar_t, int VEC>
__global__ void vaks_mix_kernel(scalar_t* __restrict__ buffer, const int64_t* __restrict__ dst,
                                const int64_t* __restrict__ src, const float* __restrict__ eps,
                                int64_t pairs, int64_t row, int64_t rows) {
  struct alignas(sizeof(scalar_t) * VEC) Pack {
    scalar_t v[VEC];
  };
  const int warps = blockDim.x / 32;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * warps + threadIdx.x / 32;
  if (p >= pairs) return;
  const int64_t d = dst[p], s = src[p];
  // A pair outside the buffer is skipped, never written through (ops.vaks_mix_ checks the ranges
  // on the CPU and in debug mode; the raw op may be called without them).
  if (d < 0 || d >= rows || s < 0 || s >= rows) return;
  const int lane = threadIdx.x % 32;
  Pack* out = reinterpret_cast<Pack*>(buffer + d * row);
  const Pack* other = reinterpret_cast<const Pack*>(buffer + s * row);
  const float w = eps[p];
  const float keep = 1.0f - w;
  const int64_t packs = row / VEC;
  for (int64_t j0 = lane; j0 < packs; j0 += 32 * kUnroll) {
    Pack a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
      if (j < packs) {
        a[u] = out[j];
        b[u] = other[j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + 32 * u;
      if (j < packs) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          a[u].v[k] = from_float<scalar_t>(keep * static_cast<float>(a[u].v[k]) + w * static_cast<float>(b[u].v[k]));
        }
        out[j] = a[u];
      }
    }
  }
}

void vaks_mix_cuda(at::Tensor& buffer, const at::Tensor& dst, const at::Tensor& src, const at::Tensor& eps) {
  check_mix_args(buffer, dst, src, eps);
  const int64_t pairs = dst.numel();
  if (pairs == 0 || buffer.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(buffer.device());
  const int64_t row = buffer.numel() / buffer.size(0);
  const at::Tensor d = dst.contiguous(), s = src.contiguous(), e = eps.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t blocks = (pairs + threads / 32 - 1) / (threads / 32);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "kcd_fast::vaks_mix_: too many pairs");
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, buffer.scalar_type(), "vaks_mix_cuda", [&] {
    scalar_t* base = buffer.data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = (reinterpret_cast<uintptr_t>(base) % 16 == 0) && (row % kVec == 0);
    if (aligned) {
      vaks_mix_kernel<scalar_t, kVec><<<blocks, threads, 0, stream>>>(
          base, d.data_ptr<int64_t>(), s.data_ptr<int64_t>(), e.data_ptr<float>(), pairs, row, buffer.size(0));
    } else {
      vaks_mix_kernel<scalar_t, 1><<<blocks, threads, 0, stream>>>(
          base, d.data_ptr<int64_t>(), s.data_ptr<int64_t>(), e.data_ptr<float>(), pairs, row, buffer.size(0));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One thread per pair; the candidates live in local memory (k <= kMaxTopK).
template <typename scalar_t>
__global__ void vaks_mix_topk_kernel(scalar_t* __restrict__ values, int32_t* __restrict__ classes,
                                     const int64_t* __restrict__ dst, const int64_t* __restrict__ src,
                                     const float* __restrict__ eps, int64_t pairs, int k, int64_t num_classes,
                                     int64_t rows) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= pairs) return;
  const int64_t d = dst[p], s = src[p];
  if (d < 0 || d >= rows || s < 0 || s >= rows) return;  // outside the buffer: skipped (see vaks_mix_kernel)
  mix_topk_row(values + d * k, classes + d * k, values + s * k, classes + s * k, k, num_classes,
               eps[p], [] __device__(scalar_t x) { return static_cast<float>(x); },
               [] __device__(float x) { return static_cast<scalar_t>(x); });
}

void vaks_mix_topk_cuda(at::Tensor& values, at::Tensor& classes, const at::Tensor& dst, const at::Tensor& src,
                        const at::Tensor& eps, int64_t num_classes) {
  const int k = check_topk_args(values, classes, dst, src, eps);
  const int64_t pairs = dst.numel();
  if (pairs == 0) return;
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor d = dst.contiguous(), s = src.contiguous(), e = eps.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = 128;
  const int64_t blocks = (pairs + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "vaks_mix_topk_cuda", [&] {
    vaks_mix_topk_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        values.data_ptr<scalar_t>(), classes.data_ptr<int32_t>(), d.data_ptr<int64_t>(), s.data_ptr<int64_t>(),
        e.data_ptr<float>(), pairs, k, num_classes, values.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(kcd_fast, CUDA, m) {
  m.impl("vaks_mix_topk_", &vaks_mix_topk_cuda);
  m.impl("rank", &rank_cuda);
  m.impl("vaks_mix_", &vaks_mix_cuda);
}

}  // namespace kcd_fast
