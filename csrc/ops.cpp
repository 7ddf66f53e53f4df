// Every op's schema, in one place. Kernels live in csrc/cpu (CPU dispatch key)
// and csrc/cuda (CUDA dispatch key); fake kernels and autograd in lora_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace lora_ext::cpu {
const char* cpu_isa();  // csrc/cpu/lowrank_microkernel.h
}
#ifdef LORA_EXT_WITH_CUDA
namespace lora_ext::cuda {
const char* compiled_archs();
}
#endif

namespace {
std::vector<std::string> build_info() {
  std::vector<std::string> info{std::string("cpu:") + lora_ext::cpu::cpu_isa()};
#ifdef LORA_EXT_WITH_CUDA
  info.push_back(std::string("cuda:") + lora_ext::cuda::compiled_archs());
#endif
  return info;
}
}  // namespace

extern "C" {
// `import lora_ext._C` loads this library, which runs the registrations below.
// The module itself is empty: every op is reached through torch.ops.lora_ext.
PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
}

TORCH_LIBRARY(lora_ext, m) {
  // y[T, out] += scale * (x[T, in] @ A[r, in]^T) @ B[out, r]^T, in place.
  m.def("lora_apply_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scale) -> ()");
  // Multi-adapter batch: y[t] += scales[a] * B_pool[a, :, :r_a] A_pool[a, :r_a] x[t] with
  // a = indices[t] (-1: no adapter), r_a = ranks[a]; out_slices splits y's columns among
  // A_pool[i] (then [n, S, r_max, in]). CUDA adds out-of-range indices to bad_index_count.
  m.def("multi_lora_(Tensor(a!) y, Tensor x, Tensor A_pool, Tensor B_pool, Tensor indices, "
        "Tensor scales, Tensor ranks, int[]? out_slices=None, Tensor(b!)? bad_index_count=None) "
        "-> ()");
  // Its halves: u[(n,) T, r_max] fp32 = scale * per-token A x, and y += scales * B u
  // (add_inputs=False: y = scales * B u; u may also be in y's dtype).
  // (Two shrink overloads: a functional one, and one that also counts bad indices.)
  m.def("lora_shrink(Tensor x, Tensor A_pool, Tensor indices, Tensor ranks, float scale=1.0) "
        "-> Tensor");
  m.def("lora_shrink.counted(Tensor x, Tensor A_pool, Tensor indices, Tensor ranks, "
        "Tensor(a!) bad_index_count, float scale=1.0) -> Tensor");
  m.def("lora_expand_(Tensor(a!) y, Tensor u, Tensor B_pool, Tensor indices, Tensor scales, "
        "Tensor ranks, int[]? out_slices=None, Tensor(b!)? bad_index_count=None, "
        "bool add_inputs=True) -> ()");
  // lora_linear: (y, u) with y = x W^T + bias + scale * (dropout(x) A^T) B^T and u the fp32
  // [T, r] activation saved for backward; W is [in, out] when fan_in_fan_out.
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, "
      "float dropout_p, Tensor? seed, bool fan_in_fan_out) -> (Tensor, Tensor)");
  // Gradients (dx, dweight, dA, dB) of lora_linear_fwd for output_mask [x, weight, A, B].
  m.def(
      "lora_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor A, Tensor B, Tensor u, "
      "float scale, float dropout_p, Tensor? seed, bool fan_in_fan_out, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // weight += sum_a scale_a * B_a A_a ((B A)^T with fan_in_fan_out), fp32, rounded once.
  m.def("merge_(Tensor(a!) weight, Tensor[] A, Tensor[] B, float[] scales, bool fan_in_fan_out) -> ()");
  // Exact move of a merged weight from the old to the new adapter set (csrc/merge_math.h).
  m.def("remerge_(Tensor(a!) weight, Tensor(b!) codes, Tensor(c!) fails, int bits, Tensor[] A_old, "
        "Tensor[] B_old, float[] s_old, Tensor[] A_new, Tensor[] B_new, float[] s_new, "
        "bool fan_in_fan_out) -> ()");
  // weight.view(-1)[idx] = merged value of vals under the adapter set.
  m.def("merge_points_(Tensor(a!) weight, Tensor idx, Tensor vals, Tensor[] A, Tensor[] B, "
        "float[] scales, bool fan_in_fan_out) -> ()");
  // For each code width k in (0, 1, 2, 4): how many elements w0[i] (any shape, the weight's
  // dtype) an exact merge under the fp32 sums s[i] could not restore from k-bit codes (int64 [4]).
  // MergeState picks its code width from these counts on a sample.
  m.def("merge_code_failures(Tensor w0, Tensor s) -> Tensor");
  // DoRA's column norm: n[o] = ||W[o, :] + scale * (B A)[o, :]||_2 over `in` (W [in, out] with
  // fan_in_fan_out), float32 [out]; the delta as merge_ computes it, never materialised.
  m.def("dora_norm(Tensor weight, Tensor A, Tensor B, float scale, bool fan_in_fan_out) -> Tensor");
  // Build facts of this binary: "cpu:<kernels picked for this CPU>", "cuda:<compiled archs>".
  m.def("build_info() -> str[]", &build_info);
}
