// 8-lane fp32 <-> 16-bit conversions for the CPU vector kernels (internal, header-only, GCC
// vector extensions; included by rows16.cpp and multi_microkernel.cpp): the exact steps of
// c10's scalar conversions (bf16: round to nearest even, NaN -> 0x7FC0; fp16:
// fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value, NaN -> sign | 0x7E00). GCC 12 would turn
// _Float16 vector conversions into one instruction per lane, so fp16 is integer arithmetic too.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 headers warn -W(maybe-)uninitialized on their own _mm*_undefined_* (GCC PR105593)
#if !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace lora_ext::cpu::vec16 {

#define LORA_EXT_AI inline __attribute__((always_inline))

typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef _Float16 h8 __attribute__((vector_size(16)));

template <class V, class P>
LORA_EXT_AI V load(const P* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V, class P>
LORA_EXT_AI void store(P* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <class To, class From>
LORA_EXT_AI To bits(From v) {
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

LORA_EXT_AI v8 widen(u16x8 h) { return bits<v8>(__builtin_convertvector(h, u32x8) << 16); }
LORA_EXT_AI float widen1(uint16_t h) { return bits<float>(static_cast<uint32_t>(h) << 16); }

LORA_EXT_AI v8 widen(h8 hv) {
  const u32x8 w = __builtin_convertvector(bits<u16x8>(hv), u32x8) << 16;
  const u32x8 sign = w & 0x80000000u, two_w = w + w;
  const v8 normalized = bits<v8>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const v8 denormalized = bits<v8>((two_w >> 17) | (126u << 23)) - 0.5f;
  const u32x8 denorm = bits<u32x8>(two_w < (1u << 27));  // all ones where subnormal
  return bits<v8>(sign | (bits<u32x8>(denormalized) & denorm) | (bits<u32x8>(normalized) & ~denorm));
}
LORA_EXT_AI float widen1(_Float16 h) {
  h8 v = {};
  v[0] = h;
  return widen(v)[0];
}

LORA_EXT_AI u16x8 narrow(v8 f, u16x8) {
  const u32x8 w = bits<u32x8>(f);
  const u32x8 r = (w + (((w >> 16) & 1u) + 0x7FFFu)) >> 16;
  const u32x8 nan = bits<u32x8>(f != f);  // all ones where NaN
  return __builtin_convertvector((r & ~nan) | (0x7FC0u & nan), u16x8);
}
LORA_EXT_AI h8 narrow(v8 f, h8) {
  const u32x8 w = bits<u32x8>(f);
  const u32x8 shl1_w = w + w, sign = w & 0x80000000u;
  v8 base = (bits<v8>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  u32x8 bias = shl1_w & 0xFF000000u;
  const u32x8 low = bits<u32x8>(bias < 0x71000000u);
  bias = (bias & ~low) | (0x71000000u & low);
  base = bits<v8>((bias >> 1) + 0x07800000u) + base;
  const u32x8 b = bits<u32x8>(base);
  const u32x8 nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  const u32x8 nan = bits<u32x8>(shl1_w > 0xFF000000u);
  return bits<h8>(__builtin_convertvector((sign >> 16) | (0x7E00u & nan) | (nonsign & ~nan), u16x8));
}
LORA_EXT_AI uint16_t narrow1(float f, uint16_t) {
  if (f != f) return 0x7FC0;
  const uint32_t w = bits<uint32_t>(f);
  return static_cast<uint16_t>((w + (((w >> 16) & 1u) + 0x7FFFu)) >> 16);
}
LORA_EXT_AI _Float16 narrow1(float f, _Float16) {
  v8 v = {};
  v[0] = f;
  return narrow(v, h8{})[0];
}

#if defined(__x86_64__) && defined(__GNUC__)
// fp16 through the F16C instructions, for functions compiled with target("avx2,f16c") or more:
// the same bits as widen/narrow above (NaN lanes fixed up to c10's sign | 0x7E00).
#define LORA_EXT_F16C_AI inline __attribute__((always_inline, target("avx2,f16c")))
LORA_EXT_F16C_AI v8 widen_f16c(h8 h) { return (v8)_mm256_cvtph_ps((__m128i)h); }
LORA_EXT_F16C_AI h8 narrow_f16c(v8 f) {
  u16x8 h = (u16x8)_mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const u16x8 nan = (u16x8)((h & 0x7FFF) > 0x7C00);  // all ones where NaN
  h = (h & ~nan) | (((h & 0x8000) | 0x7E00) & nan);
  return bits<h8>(h);
}
#endif

}  // namespace lora_ext::cpu::vec16
