#include "rows16.h"

#include <cstring>

#include "lowrank_microkernel.h"  // LORA_EXT_CLONES, f16c_conversions
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
LORA_EXT_CLONES void from_f32(const float* src, int64_t n, uint16_t* dst) { from_f32_impl<uint16_t, u16x8>(src, n, dst); }
LORA_EXT_CLONES void axpy_rounded(uint16_t* y, const float* x, float a, int64_t n) { axpy_impl<uint16_t, u16x8>(y, x, a, n); }

// fp16: the F16C instructions where f16c_conversions(), picked at the first call; else the
// integer steps.
namespace {
LORA_EXT_CLONES void to_f32_steps(const _Float16* src, int64_t n, float* dst) { to_f32_impl<_Float16, h8>(src, n, dst); }
LORA_EXT_CLONES void from_f32_steps(const float* src, int64_t n, _Float16* dst) { from_f32_impl<_Float16, h8>(src, n, dst); }
LORA_EXT_CLONES void axpy_steps(_Float16* y, const float* x, float a, int64_t n) { axpy_impl<_Float16, h8>(y, x, a, n); }

struct F16Rows {
  void (*to)(const _Float16*, int64_t, float*) = to_f32_steps;
  void (*from)(const float*, int64_t, _Float16*) = from_f32_steps;
  void (*axpy)(_Float16*, const float*, float, int64_t) = axpy_steps;
};
#if defined(__x86_64__) && defined(__GNUC__)
// the loops of to_f32_impl / from_f32_impl / axpy_impl with the F16C conversions for 8 lanes
#define LORA_EXT_F16C_FN __attribute__((target("avx2,f16c")))
LORA_EXT_F16C_FN void to_f32_f16c(const _Float16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, widen_f16c(load<h8>(src + i)));
  for (; i < n; ++i) dst[i] = widen1(src[i]);
}
LORA_EXT_F16C_FN void from_f32_f16c(const float* src, int64_t n, _Float16* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, narrow_f16c(load<v8>(src + i)));
  for (; i < n; ++i) dst[i] = narrow1(src[i], _Float16{});
}
LORA_EXT_F16C_FN void axpy_f16c(_Float16* y, const float* x, float a, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8 prod = a * load<v8>(x + i);
    store(y + i, narrow_f16c(widen_f16c(load<h8>(y + i)) + prod));
  }
  for (; i < n; ++i) {
    const float prod = a * x[i];
    y[i] = narrow1(widen1(y[i]) + prod, _Float16{});
  }
}
#endif

const F16Rows& f16_rows() {
  static const F16Rows fns = [] {
    F16Rows f;
#if defined(__x86_64__) && defined(__GNUC__)
    if (f16c_conversions()) f = {to_f32_f16c, from_f32_f16c, axpy_f16c};
#endif
    return f;
  }();
  return fns;
}
}  // namespace

void to_f32(const _Float16* src, int64_t n, float* dst) { f16_rows().to(src, n, dst); }
void from_f32(const float* src, int64_t n, _Float16* dst) { f16_rows().from(src, n, dst); }
void axpy_rounded(_Float16* y, const float* x, float a, int64_t n) { f16_rows().axpy(y, x, a, n); }

}  // namespace lora_ext::cpu
