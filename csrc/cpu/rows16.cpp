#include "rows16.h"

#include <cstring>

#include "lowrank_microkernel.h"  // LORA_EXT_CLONES
#include "vec16.h"

namespace lora_ext::cpu {
namespace {

using namespace vec16;
#define AI LORA_EXT_AI

template <class E, class V>
AI void to_f32_impl(const E* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, widen(load<V>(src + i)));
  for (; i < n; ++i) dst[i] = widen1(src[i]);
}
template <class E, class V>
AI void from_f32_impl(const float* src, int64_t n, E* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, narrow(load<v8>(src + i), V{}));
  for (; i < n; ++i) dst[i] = narrow1(src[i], E{});
}
template <class E, class V>
AI void axpy_impl(E* y, const float* x, float a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 prod = a * load<v8>(x + i);  // (a x) then + y: the scalar kernels' two roundings
    store(y + i, narrow(widen(load<V>(y + i)) + prod, V{}));
  }
  for (; i < n; ++i) {
    const float prod = a * x[i];
    y[i] = narrow1(widen1(y[i]) + prod, E{});
  }
}

}  // namespace

LORA_EXT_CLONES void to_f32(const uint16_t* src, int64_t n, float* dst) { to_f32_impl<uint16_t, u16x8>(src, n, dst); }
LORA_EXT_CLONES void to_f32(const _Float16* src, int64_t n, float* dst) { to_f32_impl<_Float16, h8>(src, n, dst); }
LORA_EXT_CLONES void from_f32(const float* src, int64_t n, uint16_t* dst) { from_f32_impl<uint16_t, u16x8>(src, n, dst); }
LORA_EXT_CLONES void from_f32(const float* src, int64_t n, _Float16* dst) { from_f32_impl<_Float16, h8>(src, n, dst); }
LORA_EXT_CLONES void axpy_rounded(uint16_t* y, const float* x, float a, int64_t n) { axpy_impl<uint16_t, u16x8>(y, x, a, n); }
LORA_EXT_CLONES void axpy_rounded(_Float16* y, const float* x, float a, int64_t n) { axpy_impl<_Float16, h8>(y, x, a, n); }

}  // namespace lora_ext::cpu
