// Operator schemas of the kcd_fast extension, and the Python module kcd_fast._C.
//
// Importing kcd_fast._C runs the static registrations below and in the
// TORCH_LIBRARY_IMPL files (csrc/cpu/*.cpp, csrc/cuda/*.cu); the ops are then
// reachable as torch.ops.kcd_fast.<name>. The Python wrappers, argument checks
// and fake (meta) kernels for torch.compile live in kcd_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

// An empty module: the ops register themselves through TORCH_LIBRARY.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "kcd_fast compiled operators (see torch.ops.kcd_fast)", -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(kcd_fast, m) {
  // Online value recording (Eq. 7 + 12), in place; returns the batch's
  // entropies, float32 [B]. values float32 [N], counts int32 [N], indices
  // int32/int64 [B], logits [B, C] fp32/fp16/bf16. The CUDA kernel is the
  // Triton kernel of kernels/update_values.py, registered from Python.
  m.def("update_values(Tensor(a!) values, Tensor(b!) counts, Tensor indices, Tensor logits, float temperature) -> Tensor");
  // Cost-aware ranking (Eq. 13): order of V^F * F^alpha, descending, ties by
  // lower index. values float32 [N], counts int32 [N] -> int64 [N].
  m.def("rank(Tensor values, Tensor counts, float alpha) -> Tensor");
  // VAKS mixing (Eq. 14), in place: buffer[dst] = (1-eps) buffer[dst] + eps buffer[src].
  // buffer [N, ...] contiguous fp32/fp16/bf16/uint8; dst, src int64 [P]; eps float32 [P].
  m.def("vaks_mix_(Tensor(a!) buffer, Tensor dst, Tensor src, Tensor eps) -> ()");
  // VAKS mixing of top-k soft labels (Eq. 14), in place: row dst becomes the top k of
  // (1-eps) decode(dst) + eps decode(src), where decode spreads 1 - sum(values) uniformly over
  // the other classes. values [N, k] fp32/fp16/bf16, classes [N, k] int32.
  m.def("vaks_mix_topk_(Tensor(a!) values, Tensor(b!) classes, Tensor dst, Tensor src, Tensor eps, int num_classes) -> ()");
}
