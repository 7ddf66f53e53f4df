// The 6x16 fp32 micro-kernels (see lowrank_microkernel.h), compiled three times: AVX-512 (one 16-lane
// register per row, k unrolled by two into 12 independent accumulators), AVX2+FMA (two 8-lane
// registers per row, 12 accumulators) and the baseline ISA; picked once at load time. The
// accumulating kernel's epilogue reads and writes fp32, bf16 or fp16 rows (vec16.h conversions).
#include "lowrank_microkernel.h"

#include <algorithm>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "vec16.h"  // also <immintrin.h> on x86-64

namespace lora_ext::cpu {
namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

// 8 elements of a row of E as fp32, and back rounded into E. Tag F16C: fp16 through the F16C
// conversion instructions (same bits as vec16's integer steps, NaN -> sign | 0x7E00 as in c10).
struct Generic {};
struct F16C {};
template <class Tag>
LORA_EXT_AI v8 ld8(Tag, const float* p) { return vec16::load<v8>(p); }
template <class Tag>
LORA_EXT_AI v8 ld8(Tag, const uint16_t* p) { return vec16::widen(vec16::load<vec16::u16x8>(p)); }
LORA_EXT_AI v8 ld8(Generic, const _Float16* p) { return vec16::widen(vec16::load<vec16::h8>(p)); }
template <class Tag>
LORA_EXT_AI void st8(Tag, float* p, v8 v) { vec16::store(p, v); }
template <class Tag>
LORA_EXT_AI void st8(Tag, uint16_t* p, v8 v) { vec16::store(p, vec16::narrow(v, vec16::u16x8{})); }
LORA_EXT_AI void st8(Generic, _Float16* p, v8 v) { vec16::store(p, vec16::narrow(v, vec16::h8{})); }
#if defined(__x86_64__) && defined(__GNUC__)
LORA_EXT_F16C_AI v8 ld8(F16C, const _Float16* p) { return vec16::widen_f16c(vec16::load<vec16::h8>(p)); }
LORA_EXT_F16C_AI void st8(F16C, _Float16* p, v8 v) { vec16::store(p, vec16::narrow_f16c(v)); }
#endif

// acc[m][0..1] (two v8 per row) = sum_k rows[m][k] * panel[k][0:16]
#define LORA_EXT_LOOP_V8                                                      \
  v8 acc[kMR][2] = {};                                                        \
  for (int64_t k = 0; k < K; ++k) {                                           \
    const v8 b0 = *reinterpret_cast<const v8u*>(panel + k * kNR);             \
    const v8 b1 = *reinterpret_cast<const v8u*>(panel + k * kNR + 8);         \
    _Pragma("GCC unroll 6") for (int m = 0; m < kMR; ++m) {                   \
      const float a = rows[m][k];                                             \
      acc[m][0] += a * b0;                                                    \
      acc[m][1] += a * b1;                                                    \
    }                                                                         \
  }

// acc[m] (one v16 per row) over even k + acc2[m] over odd k, summed at the end
#define LORA_EXT_LOOP_V16                                                     \
  v16 acc[kMR] = {}, acc2[kMR] = {};                                          \
  int64_t k = 0;                                                              \
  for (; k + 1 < K; k += 2) {                                                 \
    const v16 b0 = *reinterpret_cast<const v16u*>(panel + k * kNR);           \
    const v16 b1 = *reinterpret_cast<const v16u*>(panel + (k + 1) * kNR);     \
    _Pragma("GCC unroll 6") for (int m = 0; m < kMR; ++m) {                   \
      acc[m] += rows[m][k] * b0;                                              \
      acc2[m] += rows[m][k + 1] * b1;                                         \
    }                                                                         \
  }                                                                           \
  if (k < K) {                                                                \
    const v16 b0 = *reinterpret_cast<const v16u*>(panel + k * kNR);           \
    _Pragma("GCC unroll 6") for (int m = 0; m < kMR; ++m) acc[m] += rows[m][k] * b0; \
  }                                                                           \
  _Pragma("GCC unroll 6") for (int m = 0; m < kMR; ++m) acc[m] += acc2[m];

// The T^T N update, 8 rows: row m's scalar is a[k * lda + m], the 16-wide vector is
// brows[k][n0:16]; c += acc at the end. 8-lane ISAs take the rows in two halves of 4 (8
// accumulators), AVX-512 all 8 at once (8 accumulators).
#define LORA_EXT_TN_V8(suffix, attr)                                                           \
  attr void tn_##suffix(int64_t K, const float* a, int64_t lda, const float* const* brows,    \
                        int64_t n0, float* const* c) {                                        \
    for (int h = 0; h < kTR; h += 4) {                                                        \
      v8 acc[4][2] = {};                                                                      \
      for (int64_t k = 0; k < K; ++k) {                                                       \
        if (h == 0) __builtin_prefetch(brows[k] + n0 + 4 * kNR);                              \
        const v8 b0 = *reinterpret_cast<const v8u*>(brows[k] + n0);                           \
        const v8 b1 = *reinterpret_cast<const v8u*>(brows[k] + n0 + 8);                       \
        _Pragma("GCC unroll 4") for (int m = 0; m < 4; ++m) {                                 \
          const float s = a[k * lda + h + m];                                                 \
          acc[m][0] += s * b0;                                                                \
          acc[m][1] += s * b1;                                                                \
        }                                                                                     \
      }                                                                                       \
      for (int m = 0; m < 4; ++m) {                                                           \
        v8u* dst = reinterpret_cast<v8u*>(c[h + m]);                                          \
        dst[0] = dst[0] + acc[m][0];                                                          \
        dst[1] = dst[1] + acc[m][1];                                                          \
      }                                                                                       \
    }                                                                                         \
  }

#define LORA_EXT_DEFINE_V8(suffix, attr, Tag)                                                     \
  attr void tile_##suffix(int64_t K, const float* const* rows, const float* panel,            \
                          float (*out)[kNR]) {                                                \
    LORA_EXT_LOOP_V8                                                                          \
    for (int m = 0; m < kMR; ++m) {                                                           \
      *reinterpret_cast<v8u*>(&out[m][0]) = acc[m][0];                                        \
      *reinterpret_cast<v8u*>(&out[m][8]) = acc[m][1];                                        \
    }                                                                                         \
  }                                                                                           \
  template <class E>                                                                          \
  attr void acc_##suffix(int64_t K, const float* const* rows, const float* panel,             \
                         const E* const* src, E* const* dst, float alpha) {                   \
    for (int m = 0; m < kMR; ++m) __builtin_prefetch(src[m] + 4 * kNR);                       \
    LORA_EXT_LOOP_V8                                                                          \
    for (int m = 0; m < kMR; ++m) {                                                           \
      st8(Tag{}, dst[m], ld8(Tag{}, src[m]) + alpha * acc[m][0]);                             \
      st8(Tag{}, dst[m] + 8, ld8(Tag{}, src[m] + 8) + alpha * acc[m][1]);                     \
    }                                                                                         \
  }

LORA_EXT_DEFINE_V8(base, , Generic)
LORA_EXT_TN_V8(base, )
#if defined(__x86_64__) && defined(__GNUC__)
LORA_EXT_DEFINE_V8(avx2, __attribute__((target("avx2,fma,f16c"))), F16C)
LORA_EXT_TN_V8(avx2, __attribute__((target("avx2,fma,f16c"))))

#define LORA_EXT_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
LORA_EXT_AVX512 void tile_avx512(int64_t K, const float* const* rows, const float* panel,
                                 float (*out)[kNR]) {
  LORA_EXT_LOOP_V16
  for (int m = 0; m < kMR; ++m) *reinterpret_cast<v16u*>(&out[m][0]) = acc[m];
}
// 16 elements of a 16-bit row as fp32 and back, in one 512-bit register (vec16's bits: bf16
// round to nearest even with NaN -> 0x7FC0; fp16 by the F16C instructions, NaN -> sign | 0x7E00:
// NaN lanes become the fp32 NaN that rounds to exactly that first).
LORA_EXT_AVX512 inline v16 ld16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (v16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
}
LORA_EXT_AVX512 inline v16 ld16(const _Float16* p) {
  return (v16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LORA_EXT_AVX512 inline void st16(uint16_t* p, v16 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
  const __m512i w = _mm512_mask_mov_epi32((__m512i)v, nan, _mm512_set1_epi32(0x7FC00000));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(w, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(w, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
LORA_EXT_AVX512 inline void st16(_Float16* p, v16 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask((__m512)v, (__m512)v, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512((__m512i)v, _mm512_set1_epi32(INT32_MIN));
  const __m512i w = _mm512_mask_mov_epi32((__m512i)v, nan, _mm512_or_si512(sign, _mm512_set1_epi32(0x7FC00000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(_mm512_castsi512_ps(w), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <class E>
LORA_EXT_AVX512 void acc_avx512(int64_t K, const float* const* rows, const float* panel,
                                const E* const* src, E* const* dst, float alpha) {
  for (int m = 0; m < kMR; ++m) __builtin_prefetch(src[m] + 4 * kNR);
  LORA_EXT_LOOP_V16
  for (int m = 0; m < kMR; ++m) {
    if constexpr (std::is_same_v<E, float>) {
      *reinterpret_cast<v16u*>(dst[m]) = *reinterpret_cast<const v16u*>(src[m]) + alpha * acc[m];
    } else {
      st16(dst[m], ld16(src[m]) + alpha * acc[m]);
    }
  }
}
LORA_EXT_AVX512 void tn_avx512(int64_t K, const float* a, int64_t lda, const float* const* brows,
                               int64_t n0, float* const* c) {
  // 8 independent accumulators cover the FMA latency; K stays a plain loop so they stay in registers
  v16 acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {}, acc4 = {}, acc5 = {}, acc6 = {}, acc7 = {};
  for (int64_t k = 0; k < K; ++k, a += lda) {
    __builtin_prefetch(brows[k] + n0 + 4 * kNR);  // K row streams: help the prefetcher
    const v16 b = *reinterpret_cast<const v16u*>(brows[k] + n0);
    acc0 += a[0] * b;
    acc1 += a[1] * b;
    acc2 += a[2] * b;
    acc3 += a[3] * b;
    acc4 += a[4] * b;
    acc5 += a[5] * b;
    acc6 += a[6] * b;
    acc7 += a[7] * b;
  }
  const v16 acc[kTR] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
  _Pragma("GCC unroll 8") for (int m = 0; m < kTR; ++m) {
    v16u* dst = reinterpret_cast<v16u*>(c[m]);
    dst[0] = dst[0] + acc[m];
  }
}
#endif

using TileFn = void (*)(int64_t, const float* const*, const float*, float (*)[kNR]);
template <class E>
using AccFn = void (*)(int64_t, const float* const*, const float*, const E* const*, E* const*, float);
using TnFn = void (*)(int64_t, const float*, int64_t, const float* const*, int64_t, float* const*);

struct Kernels {
  TileFn tile;
  AccFn<float> acc_f32;
  AccFn<uint16_t> acc_bf16;
  AccFn<_Float16> acc_f16;
  TnFn tn;
  bool bf16_dot;
  const char* name;
};

// The best ISA this CPU has, or a lower one named by $LORA_EXT_CPU_ISA (avx512: without the
// AVX512-BF16 dot products; avx2; baseline): the tests run every variant on one machine that way.
Kernels pick() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const char* env = std::getenv("LORA_EXT_CPU_ISA");
  const std::string cap = env ? env : "";
  bool any = cap.empty() || cap == "avx512bf16";
  if (!any && cap != "avx512" && cap != "avx2" && cap != "baseline") {
    std::fprintf(stderr, "lora_ext: LORA_EXT_CPU_ISA=%s is not one of avx512bf16, avx512, avx2, "
                 "baseline; using the best kernels this CPU has\n", cap.c_str());
    any = true;
  }
  if ((any || cap == "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("f16c")) {
    const bool dot = any && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
    return {tile_avx512, acc_avx512<float>, acc_avx512<uint16_t>, acc_avx512<_Float16>, tn_avx512,
            dot, dot ? "avx512+bf16" : "avx512"};
  }
  if ((any || cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return {tile_avx2, acc_avx2<float>, acc_avx2<uint16_t>, acc_avx2<_Float16>, tn_avx2, false, "avx2"};
#endif
  return {tile_base, acc_base<float>, acc_base<uint16_t>, acc_base<_Float16>, tn_base, false, "baseline"};
}

const Kernels kKernels = pick();

}  // namespace

void micro_6x16(int64_t K, const float* const rows[kMR], const float* panel, float out[kMR][kNR]) {
  kKernels.tile(K, rows, panel, out);
}

void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const float* const src[kMR], float* const dst[kMR], float alpha) {
  kKernels.acc_f32(K, rows, panel, src, dst, alpha);
}
void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const uint16_t* const src[kMR], uint16_t* const dst[kMR], float alpha) {
  kKernels.acc_bf16(K, rows, panel, src, dst, alpha);
}
void micro_6x16_acc(int64_t K, const float* const rows[kMR], const float* panel,
                    const _Float16* const src[kMR], _Float16* const dst[kMR], float alpha) {
  kKernels.acc_f16(K, rows, panel, src, dst, alpha);
}

bool bf16_dot() { return kKernels.bf16_dot; }
const char* cpu_isa() { return kKernels.name; }
bool f16c_conversions() { return kKernels.tile != tile_base; }
bool avx512_kernels() { return std::strncmp(kKernels.name, "avx512", 6) == 0; }

void shrink_block(int64_t nt, int64_t K, int64_t rp, const float* const* rows, const float* Apk,
                  float* u, int64_t us, const float* zeros) {
  const float* a[kMR];
  float* c[kMR];
  float scratch[kNR];
  for (int64_t p = 0; p < rp; ++p)
    for (int64_t kc = 0; kc < K; kc += kKC) {
      const int64_t kn = std::min(kKC, K - kc);
      for (int64_t q0 = 0; q0 < nt; q0 += kMR) {
        for (int m = 0; m < kMR; ++m) {
          a[m] = (q0 + m < nt ? rows[q0 + m] : zeros) + kc;
          c[m] = q0 + m < nt ? u + (q0 + m) * us + p * kNR : scratch;
        }
        micro_6x16_acc(kn, a, Apk + (p * K + kc) * kNR, c, c, 1.f);
      }
    }
}

void micro_tn_8x16_acc(int64_t K, const float* a, int64_t lda, const float* const* brows, int64_t n0,
                       float* const c[kTR]) {
  kKernels.tn(K, a, lda, brows, n0, c);
}

}  // namespace lora_ext::cpu
