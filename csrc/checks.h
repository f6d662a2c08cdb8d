// The kernels' own argument checks, shared by the CPU and CUDA implementations. The user-facing
// validation (naming each argument) is in kcd_fast/ops.py; these guard the kernels' assumptions
// when the ops are called directly through torch.ops.kcd_fast.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "kcd_fast.h"

namespace kcd_fast {

inline void check_rank_args(const at::Tensor& values, const at::Tensor& counts) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && counts.scalar_type() == at::kInt,
              "kcd_fast::rank: values must be float32 and counts int32");
  TORCH_CHECK(values.dim() == 1 && counts.sizes() == values.sizes(),
              "kcd_fast::rank: values and counts must be 1-D of the same size");
  TORCH_CHECK(counts.device() == values.device(), "kcd_fast::rank: values and counts must be on one device");
}

// rows: the tensor the pairs index (the buffer, or the top-k values): a kernel on its device would
// otherwise dereference another device's pointers.
inline void check_pair_args(const char* op, const at::Tensor& rows, const at::Tensor& dst, const at::Tensor& src,
                            const at::Tensor& eps) {
  TORCH_CHECK(dst.device() == rows.device() && src.device() == rows.device() && eps.device() == rows.device(),
              "kcd_fast::", op, ": dst, src and eps must be on the device of the rows they index");
  TORCH_CHECK(dst.scalar_type() == at::kLong && src.scalar_type() == at::kLong && eps.scalar_type() == at::kFloat,
              "kcd_fast::", op, ": dst/src must be int64 and eps float32");
  TORCH_CHECK(dst.dim() == 1 && src.sizes() == dst.sizes() && eps.sizes() == dst.sizes(),
              "kcd_fast::", op, ": dst, src and eps must be 1-D of the same size");
}

inline void check_mix_args(const at::Tensor& buffer, const at::Tensor& dst, const at::Tensor& src,
                           const at::Tensor& eps) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.dim() >= 1, "kcd_fast::vaks_mix_: buffer must be contiguous [N, ...]");
  check_pair_args("vaks_mix_", buffer, dst, src, eps);
}

// Returns k.
inline int check_topk_args(const at::Tensor& values, const at::Tensor& classes, const at::Tensor& dst,
                           const at::Tensor& src, const at::Tensor& eps) {
  TORCH_CHECK(values.is_contiguous() && classes.is_contiguous() && values.dim() == 2 &&
                  classes.sizes() == values.sizes() && classes.scalar_type() == at::kInt,
              "kcd_fast::vaks_mix_topk_: values and classes must be contiguous [N, k], classes int32");
  const int k = static_cast<int>(values.size(1));
  TORCH_CHECK(k >= 1 && k <= kMaxTopK, "kcd_fast::vaks_mix_topk_: k must lie in [1, ", std::to_string(kMaxTopK), "]");
  TORCH_CHECK(classes.device() == values.device(), "kcd_fast::vaks_mix_topk_: values and classes must be on one device");
  check_pair_args("vaks_mix_topk_", values, dst, src, eps);
  return k;
}

}  // namespace kcd_fast
