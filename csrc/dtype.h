// The one dtype-dispatch helper. Torch-free so that .cu files can use it.
//
// Both backends name their element types differently (c10::BFloat16 on the CPU,
// __nv_bfloat16 in CUDA), so the caller supplies the three types and gets a
// lambda called with a tag whose ::type is the element type:
//
//   dispatch_dtype<float, __half, __nv_bfloat16>(dt, [&](auto tag) {
//     using T = typename decltype(tag)::type; ...
//   });
#pragma once
#include <stdexcept>

// Functions shared by host and device code (element math used by CPU and CUDA kernels alike).
#if defined(__CUDACC__)
#define LORA_EXT_HD __host__ __device__ __forceinline__
#else
#define LORA_EXT_HD inline
#endif

namespace lora_ext {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

template <class T>
struct TypeTag {
  using type = T;
};

template <class F32T, class F16T, class BF16T, class Fn>
inline decltype(auto) dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::F16:
      return fn(TypeTag<F16T>{});
    case DType::BF16:
      return fn(TypeTag<BF16T>{});
    case DType::F32:
    default:
      return fn(TypeTag<F32T>{});
  }
}

}  // namespace lora_ext
